# Adapted from MONAI Label's `monaibundle` sample app (sample-apps/monaibundle/main.py of monailabel 0.8.5),
# Copyright (c) MONAI Consortium, licensed under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0). Changes: restricted to inference with bundles on local disk (no Model
# Zoo download, no trainers, scoring or SAM2), and the optional `bundle_overrides` setting.
"""MONAI Label app serving the tsgm bundles from this repository.

    monailabel start_server --app bundles/vejp_anomaly/monailabel_app --studies STUDIES --conf models vejp_anomaly

Settings (``--conf KEY VALUE``):
    models            comma-separated bundle names (default ``vejp_anomaly``)
    bundles_dir       folder holding the bundles (default: the folder above this app, i.e. ``bundles/``)
    bundle_overrides  JSON object of bundle config keys to override, e.g. ``'{"sample_batch_size": 64}'``
    preload           load the network when the server starts (default false)

The image sent to the ``vejp_anomaly`` model is ONE 4-channel NIfTI whose channels are the co-registered
T1, T1ce, T2 and FLAIR volumes in that order (the bundle's ``channel_modalities``).
"""

import json
import logging
import os
from typing import Dict

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)


def local_bundles(app_dir: str, conf: Dict[str, str]) -> Dict[str, str]:
    """Bundle name -> folder, from local disk only (the sample app would download missing ones from the Model Zoo)."""
    bundles_dir = conf.get("bundles_dir") or os.path.dirname(os.path.dirname(os.path.abspath(app_dir)))
    names = [n.strip() for n in conf.get("models", "vejp_anomaly").split(",") if n.strip()]
    bundles = {}
    for name in names:
        path = os.path.join(bundles_dir, name)
        if not os.path.isfile(os.path.join(path, "configs", "metadata.json")):
            raise FileNotFoundError(f"bundle {name!r} not found: {path} has no configs/metadata.json")
        bundles[name] = path
    return bundles


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.models = local_bundles(app_dir, conf)
        self.bundle_overrides = json.loads(conf.get("bundle_overrides") or "{}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - tsgm bundles ({monailabel.__version__})",
            description="tsgm MONAI bundles served from local disk",
            version=monailabel.__version__,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, path in self.models.items():
            task = BundleInferTask(path, self.conf)
            if not task.is_valid():
                raise RuntimeError(f"MONAI Label refused bundle {path} (see the log above)")
            if self.bundle_overrides:
                task.bundle_config.update(self.bundle_overrides)
                task.bundle_config.parse()
            logger.info(f"+++ Adding Inferer:: {name} => {path}")
            infers[name] = task
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}
