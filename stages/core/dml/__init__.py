"""The DML task for the shared loop (:mod:`stages.core.training`): its objective, base losses, language
matching and S2SD."""
