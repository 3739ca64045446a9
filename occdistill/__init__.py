"""occdistill: camera-based 3D semantic occupancy, distilled from heavy teachers into real-time students.

Importing the package has no side effects; the layers are imported explicitly
(``occdistill.geometry``, ``occdistill.data``, ``occdistill.metrics``, ...).
"""

__version__ = "0.1.0"
