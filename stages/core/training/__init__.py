"""Training: the one loop (``fit``) and what it runs: the DML objective, the loss terms (base DML losses,
language matching, DivE's set terms), optimisers and schedules, checkpoints, DDP and the live logs."""
