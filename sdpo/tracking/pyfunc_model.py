"""The registered pyfunc model as code (MLflow models-from-code): MLflow runs this file to build the model.

Nothing is unpickled when the model loads, and MLflow does not warn about cloudpickle when it is logged.
"""

import mlflow

from sdpo.compat import restore_typing_patches

restore_typing_patches()  # a process that imported metaflow's Runner first can still import torch and diffusers

from sdpo.tracking.pyfunc import DiffusersPipelineModel  # noqa: E402

mlflow.models.set_model(DiffusersPipelineModel())
