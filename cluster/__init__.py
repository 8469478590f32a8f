"""One Jamba model replica spread over Ray actors: layer groups and expert shards."""
