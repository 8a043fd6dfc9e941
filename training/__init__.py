"""The training sidecar: pretrain with Muon (Moonlight), RL-tune with Kimi k1.5, publish for hot reload.

- ``muon``: Newton-Schulz + Moonlight update (functional core), parameter routing, ``HybridOptimizer``.
- ``data`` / ``tokenizer`` / ``tasks``: offline corpus (stdlib sources, docstrings, arithmetic dialogues),
  byte-level BPE + ChatML template, exact-match arithmetic tasks.
- ``pretrain`` / ``checkpoint``: resumable training loop (exact resume) with validation loss.
- ``rl_loss`` / ``rollout`` / ``rl``: k1.5 loss, length penalty, prompt filter, curriculum; rollouts via LLMEngine.
- ``publish``: ``<model_dir>/<name>/v<step>`` HF folders, ``latest_version``, ``validate_checkpoint``.
- ``cli``: ``train_cli(argv)`` for ``crescent train {pretrain,rl,demo}``.
"""
