"""LoRA fine-tuning of the jamba/ model on Ray Train, and the generated arithmetic task."""
