"""Read and write checkpoints in the Hugging Face layout: config.json plus safetensors, single or sharded.

Tensor names are those of transformers' `JambaForCausalLM` with one tensor per expert
(`model.layers.N.feed_forward.experts.E.gate_proj.weight`). Fused expert tensors, as transformers 5 holds them in
memory (`experts.gate_up_proj` (E, 2F, D) and `experts.down_proj` (E, D, F)), are read as well and split per expert.
Only safetensors are read: pickled weight files can run code when loaded.
"""

import json
import logging
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file

from jamba.model import Jamba, JambaArgs

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FUSED = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message lists every problem found."""


def load_args(path) -> JambaArgs:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: a checkpoint directory needs config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
    return JambaArgs.from_dict(config)


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory, by their per-expert names.

    Files are memory-mapped and each tensor is read when asked for, so a process that owns part of a model reads
    only that part.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._sources: dict[str, tuple[Path, str, int | None, str | None]] = {}
        self._handles = {}
        for file in self._weight_files():
            try:
                handle = safe_open(str(file), framework="pt")
                stored = list(handle.keys())
            except Exception as error:  # safetensors raises its own error types for truncated or corrupt files
                raise CheckpointError(f"cannot read {file} as safetensors: {error}") from error
            self._handles[file] = handle
            for key in stored:
                self._add_source(file, key, handle)

    def _weight_files(self) -> list[Path]:
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} not found")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index: {error!r}") from error
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shards listed in {index} are missing: {missing}")
            return files
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE]
        others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f"; found {others}, which are not read because pickled files can run code" if others else ""
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}{hint}")

    def _add_source(self, file, key, handle):
        fused = _FUSED.match(key)
        if not fused:
            self._sources[key] = (file, key, None, None)
            return
        prefix, kind = fused.groups()
        num_experts = handle.get_slice(key).get_shape()[0]
        for expert in range(num_experts):
            if kind == "down_proj":
                self._sources[f"{prefix}.{expert}.down_proj.weight"] = (file, key, expert, None)
            else:
                self._sources[f"{prefix}.{expert}.gate_proj.weight"] = (file, key, expert, "first")
                self._sources[f"{prefix}.{expert}.up_proj.weight"] = (file, key, expert, "second")

    def keys(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        file, key, expert, half = self._sources[name]
        shape = list(self._handles[file].get_slice(key).get_shape())
        if expert is not None:
            shape = shape[1:]
        if half is not None:
            shape[0] //= 2
        return tuple(shape)

    def get(self, name: str) -> torch.Tensor:
        file, key, expert, half = self._sources[name]
        if expert is None:
            return self._handles[file].get_tensor(key)
        tensor = self._handles[file].get_slice(key)[expert]
        if half is not None:
            rows = tensor.shape[0] // 2
            tensor = tensor[:rows] if half == "first" else tensor[rows:]
        return tensor.contiguous()

    def files(self) -> list[Path]:
        return list(self._handles)


def fill_module(module: torch.nn.Module, reader: CheckpointReader, device, dtype, prefix: str = "",
                expected_extra: set[str] = frozenset(), partial: bool = False) -> None:
    """Load every parameter of `module` (built on the meta device) from the checkpoint.

    `prefix` maps module names to checkpoint names; names in the checkpoint under that prefix that the module does
    not have are an error unless listed in `expected_extra`, or unless `partial` says that the module is one part
    of the model (a layer group or an expert shard). Raises CheckpointError listing the missing, unexpected and
    mis-shaped tensors.
    """
    wanted = {prefix + name: name for name, _ in module.named_parameters(remove_duplicate=False)}
    available = {k for k in reader.keys() if k.startswith(prefix)}
    missing = sorted(k for k in wanted if k not in available)
    unexpected = [] if partial else sorted(available - wanted.keys() - set(expected_extra))
    mis_shaped = []
    params = dict(module.named_parameters(remove_duplicate=False))
    for key, name in wanted.items():
        if key in available and reader.shape(key) != tuple(params[name].shape):
            mis_shaped.append(f"{key}: checkpoint {list(reader.shape(key))}, model {list(params[name].shape)}")
    problems = [f"{label} ({len(keys)}): {keys}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)) if keys]
    if problems:
        raise CheckpointError(f"checkpoint {reader.path} does not match the model: " + "; ".join(problems))

    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(reader._sources[key][0], []).append(key)
    for number, (file, keys) in enumerate(sorted(by_file.items()), start=1):
        if len(by_file) > 1:
            log.info("loading shard %d/%d: %s (%d tensors)", number, len(by_file), file.name, len(keys))
        for key in keys:
            value = reader.get(key)
            set_module_tensor_to_device(module, wanted[key], device, value=value, dtype=dtype or value.dtype)


def load_pretrained(path, device="cpu", dtype: torch.dtype | None = None, scan: str = "auto") -> Jamba:
    """Build the model on the meta device and fill it tensor by tensor, so only one copy is ever in memory."""
    args = load_args(path)
    reader = CheckpointReader(path)
    with init_empty_weights():
        model = Jamba(args, scan=scan)
    if args.tie_word_embeddings:
        # One tensor, loaded under the embedding's name; a checkpoint may still carry lm_head.weight.
        del model.lm_head.weight
        fill_module(model.model, reader, device, dtype, prefix="model.", expected_extra=set())
        model.lm_head.weight = model.model.embed_tokens.weight
        extra = sorted(set(reader.keys()) - {"model." + n for n, _ in model.model.named_parameters()}
                       - {"lm_head.weight"})
        if extra:
            raise CheckpointError(f"checkpoint {reader.path} does not match the model: unexpected ({len(extra)}): {extra}")
    else:
        fill_module(model, reader, device, dtype)
    return model.eval()


def save_pretrained(model: Jamba, path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and the weights, split into shards of at most max_shard_bytes when given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
