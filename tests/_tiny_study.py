"""A whole study in seconds: TextWorldExpress coin with 2 rooms, a 1-layer Llama, 8 golden tasks, 2 test games per
split (each also with one injected error). tests/conftest.py's `tiny_study` runs it once per session."""

TINY = {
    "env": {"name": "twx", "kwargs": {"game": "coin", "max_steps": 8,
                                      "game_params": "numLocations=2,numDistractorItems=0,includeDoors=0"},
            "workers": 2},
    "golden": {"source": "expert", "split": "train", "limit": 8},
    "model": {"init": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024}},
    "train": {"num_train_epochs": 1, "learning_rate": 0.003, "per_device_train_batch_size": 1, "max_length": 1024,
              "warmup_ratio": 0.0, "num_threads": 1, "progress": False, "save_steps": 1000},
    "synthesis": {"teacher": "expert"},
    "filter": {"max_errors": 8},
    "methods": ["golden_d1", "golden_all", "step"],
    "eval": {"splits": ["seen", "unseen"], "limit": 2, "inject": {"step": 1}},
}
