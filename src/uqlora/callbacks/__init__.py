from uqlora.callbacks.calibration import CalibrationCallback
from uqlora.callbacks.checkpoint import BestAdapterCheckpoint

__all__ = ["BestAdapterCheckpoint", "CalibrationCallback"]
