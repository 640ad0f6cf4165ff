"""The one training loop (``fit``) and its services: optimisers and schedules, checkpoints and their
fingerprints, DDP, the live logs. Nothing here knows a task: each task package (:mod:`stages.core.dml`,
:mod:`stages.core.imagetext`) hands the loop an objective."""
