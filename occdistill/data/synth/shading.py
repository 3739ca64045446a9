"""Procedural appearance: per-material textures, Lambertian light, exposure, fog and sensor noise.

The goal is a learnable but not trivial image task: classes differ in base colour *and* texture,
instances jitter in colour (cars come in every colour, so colour alone does not give the class),
and light direction, exposure and white balance change from frame to frame and camera to camera.

Textures are solid (3D) functions of the hit point in the solid's local frame, so they stick to
moving objects and look the same from every camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occdistill.data.synth.primitives import Primitives
from occdistill.data.synth.render import GROUND, RayImage, Surface

# Material ids (Primitives.material).
PLAIN, FACADE, VEHICLE, STRIPES, FOLIAGE, BARK, WOOD, FABRIC, SCREEN, GLASS, WALLPAPER, METAL = range(12)

# Fixed random wave vectors of the sine-sum noise (a cheap, smooth 3D noise).
_WAVES = np.random.default_rng(12345).normal(size=(6, 3))
_WAVES = (_WAVES / np.linalg.norm(_WAVES, axis=1, keepdims=True)).astype(np.float32)
_PHASES = np.random.default_rng(54321).uniform(0, 2 * np.pi, size=6).astype(np.float32)


def noise(p: np.ndarray, freq: float) -> np.ndarray:
    """Smooth noise in [-1, 1] (float32) at points (N, 3) with spatial frequency ``freq`` (1/m).

    float32 is plenty for a texture as long as the points are local (metres from the origin)."""
    arg = p.astype(np.float32) @ (_WAVES.T * np.float32(freq * 2 * np.pi)) + _PHASES
    return np.sin(arg, out=arg).sum(axis=-1) / np.float32(2.45)


def cell_hash(ix: np.ndarray, iy: np.ndarray, seed: int = 0) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer cell (ix, iy)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (seed * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def material_albedo(material: np.ndarray, color: np.ndarray, local: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Albedo (N, 3) of hits on solids: base ``color`` (N, 3) modulated by the material's texture
    at the local hit points ``local`` (N, 3) of solids with half extents ``half`` (N, 3)."""
    out = color.astype(np.float64).copy()
    fine = noise(local, 3.0)
    for m in np.unique(material):
        s = material == m
        p, c, h = local[s], out[s], half[s]
        if m == PLAIN:
            c *= (1 + 0.08 * fine[s])[:, None]
        elif m == METAL:
            c *= (1 + 0.05 * noise(p, 0.7) + 0.25 * (p[:, 2] / np.maximum(h[:, 2], 1e-3)))[:, None]
        elif m == FACADE:
            # Window grid on the vertical faces: 3 m storeys, windows every 2.6 m along the face.
            along = np.where(np.abs(np.abs(p[:, 0]) - h[:, 0]) < np.abs(np.abs(p[:, 1]) - h[:, 1]), p[:, 1], p[:, 0])
            z = p[:, 2] + h[:, 2]
            fu, fz = np.mod(along, 2.6) / 2.6, np.mod(z, 3.0) / 3.0
            window = (fu > 0.25) & (fu < 0.75) & (fz > 0.3) & (fz < 0.8) & (z > 2.0) & (z < 2 * h[:, 2] - 0.6)
            lit = cell_hash(np.floor(along / 2.6), np.floor(z / 3.0)) > 0.7
            glass = np.where(lit[:, None], [0.85, 0.8, 0.55], [0.18, 0.22, 0.3])
            c *= (1 + 0.1 * fine[s])[:, None]
            c[window] = glass[window]
        elif m == VEHICLE:
            # Dark glass band on the upper part of the body, darker bottom (tyres, shadow).
            zr = (p[:, 2] + h[:, 2]) / (2 * h[:, 2])
            c *= (1 + 0.04 * fine[s])[:, None]
            c[(zr > 0.55) & (zr < 0.9)] = (0.12, 0.14, 0.18)
            c[zr < 0.15] *= 0.3
        elif m == STRIPES:
            # Diagonal warning stripes on barriers; on a thin cone they read as horizontal bands.
            band = np.mod(np.floor((p[:, 0] + p[:, 1] + p[:, 2]) / 0.3), 2) == 1
            c[band] = (0.95, 0.95, 0.92)
        elif m == FOLIAGE:
            c *= (0.75 + 0.35 * noise(p, 4.0) + 0.15 * noise(p, 11.0))[:, None]
        elif m == BARK:
            c *= (0.8 + 0.2 * np.sin(np.arctan2(p[:, 1], p[:, 0]) * 9 + 3 * fine[s]))[:, None]
        elif m == WOOD:
            # Planks 0.15 m wide and 1.2 m long along local x, each its own shade, with fine grain.
            plank = cell_hash(np.floor(p[:, 1] / 0.15), np.floor(p[:, 0] / 1.2 + 0.37 * np.floor(p[:, 1] / 0.15)), 7)
            grain = np.sin(p[:, 0] * 55.0 + 3.0 * noise(p, 2.0))
            c *= (0.78 + 0.25 * plank + 0.05 * grain)[:, None]
        elif m == FABRIC:
            weave = np.sin(p[:, 0] * 120) * np.sin(p[:, 1] * 120 + p[:, 2] * 120)
            c *= (0.9 + 0.06 * weave + 0.08 * noise(p, 6.0))[:, None]
        elif m == SCREEN:
            frame = (np.abs(p[:, 1]) > h[:, 1] - 0.04) | (np.abs(p[:, 2]) > h[:, 2] - 0.04)
            c[:] = (0.05, 0.06, 0.08)
            c[~frame] += 0.15 * (0.5 + 0.5 * noise(p, 2.0))[~frame, None] * np.array([0.4, 0.6, 1.0])
        elif m == GLASS:
            c *= (0.9 + 0.1 * noise(p, 1.0))[:, None]
            mullion = (np.mod(p[:, 0] + p[:, 1], 0.6) < 0.04) | (np.mod(p[:, 2], 0.6) < 0.04)
            c[mullion] = (0.92, 0.92, 0.9)
        elif m == WALLPAPER:
            c *= (1 + 0.03 * fine[s] + 0.03 * np.sin((p[:, 0] + p[:, 1]) * 25))[:, None]
        out[s] = c
    return np.clip(out, 0.0, 1.0)


@dataclass(frozen=True)
class Lighting:
    """Light of one image. ``sun`` is the unit direction towards the light (reference frame) for
    a directional light, or the light position when ``point`` is set (indoor lamp)."""

    sun: np.ndarray  # (3,)
    ambient: float
    diffuse: float
    exposure: float
    white_balance: np.ndarray  # (3,) per-channel gain
    sky_horizon: np.ndarray  # (3,)
    sky_zenith: np.ndarray  # (3,)
    fog_distance: float  # metres; inf disables fog
    point: bool = False


def shade(
    rays: RayImage,
    surf: Surface,
    prims: Primitives,
    ground_albedo: np.ndarray | None,
    light: Lighting,
    far: float,
    noise_std: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a cast: albedo x (ambient + diffuse * cos) x exposure, sky where
    nothing was hit, fog towards the horizon colour near ``far``, Gaussian sensor noise.

    ``ground_albedo`` (G, 3) holds the albedo of the ground hits, in their order in ``surf``.
    """
    h, w = rays.shape
    dirs = rays.dirs.reshape(-1, 3)
    unit = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    # Sky: horizon-to-zenith gradient with faint clouds; also the fog colour.
    elev = np.clip(unit[:, 2], 0.0, 1.0)[:, None]
    sky = light.sky_horizon + (light.sky_zenith - light.sky_horizon) * np.sqrt(elev)
    up = np.nonzero(elev[:, 0] > 0.02)[0]
    sky[up] += 0.06 * np.clip(noise(unit[up] * 3.0, 1.0), 0, 1)[:, None]
    rgb = sky.copy()

    n = len(surf.flat)
    if n:
        albedo = np.zeros((n, 3))
        g = surf.index == GROUND
        if g.any():
            albedo[g] = ground_albedo
        o = ~g
        if o.any():
            idx = surf.index[o]
            albedo[o] = material_albedo(prims.material[idx], prims.color[idx], surf.local[o], prims.half[idx])
        if light.point:
            to_light = light.sun - surf.point
            dist = np.linalg.norm(to_light, axis=-1, keepdims=True)
            ldir = to_light / np.maximum(dist, 1e-6)
            falloff = 1.0 / (1.0 + 0.04 * dist[:, 0] ** 2)
        else:
            ldir = light.sun[None, :]
            falloff = 1.0
        lambert = np.clip((surf.normal * ldir).sum(axis=-1), 0.0, 1.0) * falloff
        lit = albedo * (light.ambient + light.diffuse * lambert)[:, None]
        dist = np.linalg.norm(surf.point - rays.origin, axis=-1)
        fog = 1.0 - np.exp(-dist / light.fog_distance)
        fog = np.maximum(fog, np.clip((dist - 0.75 * far) / (0.25 * far), 0.0, 1.0))  # hide the far cut
        rgb[surf.flat] = lit * (1 - fog[:, None]) + sky[surf.flat] * fog[:, None]
    rgb = rgb * light.exposure * light.white_balance
    rgb = rgb.reshape(h, w, 3)
    rgb = rgb + rng.normal(0.0, noise_std, size=rgb.shape)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
