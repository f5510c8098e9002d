"""The MLflow model of every Tessera domain, as "models from code" (MLflow loads this file; nothing is pickled).

A registered version is an MLflow pyfunc model: ``MLmodel`` (signature, input example, pip requirements),
this file, the code of ``shared`` and of the domain's package, and as its one artifact the Tessera model folder
(``weights.safetensors``, ``config.json``, the saved state). So ``mlflow.pyfunc.load_model``, ``mlflow models
serve``, ``spark_udf`` and ``bentoml.mlflow.import_model`` work on it, and the BentoML services read the same
folder. What ``predict`` takes and returns is the domain's (``Domain.pyfunc_predict``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "tessera_model"  # the artifact key of the Tessera model folder


class TesseraModel(PythonModel):
    """Loads the Tessera model folder and answers with its domain's ``pyfunc_predict``."""

    def load_context(self, context: Any) -> None:
        from shared import registry
        from shared.tracking import load_model_dir

        folder = Path(context.artifacts[ARTIFACT])
        package = json.loads((folder / "config.json").read_text()).get("package")
        if package and package not in registry.packages():  # a domain kept outside services/
            listed = os.environ.get(registry.DOMAIN_PACKAGES_ENV, "")
            os.environ[registry.DOMAIN_PACKAGES_ENV] = ",".join(p for p in (listed, package) if p)
        self.loaded = load_model_dir(folder)

    def predict(self, context, model_input, params=None):
        # (no type hints: MLflow would read them as the input schema; the logged signature is the schema)
        from shared import registry

        return registry.get(self.loaded.domain).pyfunc_predict(self.loaded, model_input, dict(params or {}))


mlflow.models.set_model(TesseraModel())
