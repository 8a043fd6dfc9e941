"""The tiny pretraining run (PretrainSettings fields) that the training tests share: seconds on CPU."""

TINY = dict(steps=6, eval_every=3, checkpoint_every=100, code_bytes=60_000, n_dialogues=300, vocab_size=400,
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, batch_size=2,
            seq_len=32, moba_block_size=8, moba_topk=2, full_layers=[0], lr=0.01, warmup_steps=2,
            eval_batches=1, progress=False)
