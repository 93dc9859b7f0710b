"""MLflow tracking for sdpo: run logging (:mod:`.runs`), the diffusers pyfunc model (:mod:`.pyfunc`),
the model registry (:mod:`.registry`) and the promotion policy (:mod:`.policy`).

Kept import-free on purpose: a registered model's code snapshot imports ``sdpo.tracking.pyfunc`` and should not
pull in anything else.
"""
