"""A diffusers pipeline folder as an MLflow pyfunc model: prompts (and seeds) in, base64 PNG images out.

The model is logged as code (MLflow models-from-code, ``pyfunc_model.py``): nothing is pickled. That file imports
:class:`DiffusersPipelineModel` from ``sdpo``, so :func:`log_pipeline_model` ships a snapshot of the ``sdpo``
package as the model's ``code_paths``: the model loads in any environment with its pinned requirements, sdpo
installed or not.
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from sdpo.errors import ModelError

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # models-from-code: the class is never pickled
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.0
# what the model needs at load time; exact versions are taken from this environment
RUNTIME_PACKAGES = (
    "mlflow",
    "cloudpickle",
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "accelerate",
    "safetensors",
    "numpy",
    "pillow",
    "pandas",
    "pydantic",
    "pyyaml",
)


class DiffusersPipelineModel(mlflow.pyfunc.PythonModel):
    """Text-to-image generation with a diffusers pipeline stored as the artifact ``pipeline``.

    Input: a DataFrame with ``prompt`` (required) and ``seed`` (optional; default: the row number).
    Params: ``num_inference_steps``, ``guidance_scale`` (diffusers convention, 1.0 = no guidance).
    Output: a DataFrame with ``prompt``, ``seed`` and ``image`` (PNG bytes, base64-encoded).
    """

    max_batch = 8  # images generated per pipeline call

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from sdpo.compat import restore_typing_patches

        restore_typing_patches()
        import torch
        from diffusers import DiffusionPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = DiffusionPipeline.from_pretrained(context.artifacts["pipeline"]).to(device)
        self.pipeline.set_progress_bar_config(disable=True)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        import torch

        if "prompt" not in model_input.columns:
            raise ValueError(f"model input needs a 'prompt' column; got columns {list(model_input.columns)}")
        params = params or {}
        steps = int(params.get("num_inference_steps", DEFAULT_STEPS))
        guidance = float(params.get("guidance_scale", DEFAULT_GUIDANCE))
        prompts = [str(p) for p in model_input["prompt"]]
        seeds = _seeds(model_input)
        images: list[str] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            # CPU generators: the same seed gives the same noise on CPU and GPU
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[chunk]]
            result = self.pipeline(
                prompt=prompts[chunk],
                generator=generators,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="pil",
            )
            images += [_png_base64(image) for image in result.images]
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image": images})


def _seeds(model_input: pd.DataFrame) -> list[int]:
    if "seed" not in model_input.columns:
        return list(range(len(model_input)))
    return [row if pd.isna(seed) else int(seed) for row, seed in enumerate(model_input["seed"])]


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(encoded: str) -> Any:
    """A PIL image from one ``image`` value of :meth:`DiffusersPipelineModel.predict`."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def pipeline_signature(steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE) -> ModelSignature:
    """Input/output schema and params of :class:`DiffusersPipelineModel` (``seed`` is an optional column)."""
    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)])
    outputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")])
    params = ParamSchema(
        [ParamSpec("num_inference_steps", "long", steps), ParamSpec("guidance_scale", "double", guidance_scale)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pinned_requirements() -> list[str]:
    """``name==version`` for the runtime packages, from this environment (local labels like ``+cpu`` dropped:
    they name a wheel index, and the serving machine picks its own build)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    return pins


def _sdpo_code_snapshot(into: Path) -> Path:
    package = Path(__file__).resolve().parents[1]
    target = into / "sdpo"
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def log_pipeline_model(
    model_dir: str,
    name: str = "model",
    registered_model_name: str | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> mlflow.models.model.ModelInfo:
    """Log a diffusers pipeline folder as a pyfunc model in the active run (or a new one).

    ``steps`` and ``guidance_scale`` become the default params of the signature. MLflow checks the logged model
    by loading it and generating the input example once, with a single inference step.
    """
    if not (Path(model_dir) / "model_index.json").is_file():
        raise ModelError(f"{model_dir}: not a diffusers pipeline folder (model_index.json missing)")
    example = pd.DataFrame({"prompt": ["a red square"], "seed": [0]})
    with tempfile.TemporaryDirectory(prefix="sdpo-code-") as tmp, warnings.catch_warnings():
        # MLflow infers a schema from the example to check it and hints that its integer `seed` cannot hold missing
        # values; the signature above declares `seed` an optional long, and a missing seed becomes the row's number.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"pipeline": str(model_dir)},
            code_paths=[str(_sdpo_code_snapshot(Path(tmp)))],
            signature=pipeline_signature(steps, guidance_scale),
            input_example=(example, {"num_inference_steps": 1}),
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_model_name,
        )
