"""The built-in synthetic world (``occdistill synth``): procedural street and room scenes
rendered by vectorised ray casting, written in the real Occ3D-nuScenes and Occ-ScanNet formats.

Public entry point: :func:`generate` (returns a :class:`SynthResult`); configs:
:class:`StreetConfig` and :class:`RoomConfig`.

Modules, one job each: ``config`` (typed configs), ``primitives`` (analytic solids), ``assets``
(object shapes), ``scene_street`` / ``scene_room`` (procedural layouts, traffic, camera paths),
``rig`` (sensor mounts), ``render`` (ray casting), ``shading`` (appearance), ``voxelize``
(occupancy and visibility masks), ``street_frame`` / ``room_frame`` (one frame's data),
``writer_occ3d`` / ``writer_occscannet`` (file layouts), ``generate`` (orchestration, resume).
"""

from occdistill.data.synth.config import RoomConfig, StreetConfig
from occdistill.data.synth.generate import SynthResult, generate, resolve_config

__all__ = ["RoomConfig", "StreetConfig", "SynthResult", "generate", "resolve_config"]
