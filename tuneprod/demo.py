"""Procedural "retail product" image set for trying tuneprod without real data.

Each class is a product (box, can or bottle) with its own printed design.
Training photos are taken at camera elevations 0 and 30 degrees; the test
split adds 60 degrees, a viewpoint the model never saw, so it shows how well
a configuration generalises.  Products are ray cast analytically (a box and
stacks of cone frusta), shaded with a random light and rendered at twice the
target size, then box-filtered down for antialiasing.
"""

from __future__ import annotations

import colorsys
import csv
import secrets
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

TRAIN_ELEVATIONS = (0.0, 30.0)
TRAIN_MANIFEST = "train.csv"
TEST_ELEVATIONS = (0.0, 30.0, 60.0)
SHAPES = ("box", "can", "bottle")
STRIPE_ORIENTATIONS = ("hstripes", "vstripes", "dstripes")
MARK_SHAPES = ("disc", "square", "triangle", "cross")

# Few body colours, so that several classes share one and the model has to
# look at stripes, marks, lid and shape.
BODY_COLOURS = {
    "red": (0.78, 0.12, 0.12),
    "blue": (0.12, 0.30, 0.75),
    "green": (0.15, 0.55, 0.20),
    "yellow": (0.95, 0.80, 0.15),
    "orange": (0.95, 0.50, 0.10),
    "purple": (0.50, 0.20, 0.60),
    "white": (0.92, 0.92, 0.90),
    "black": (0.12, 0.12, 0.14),
    "teal": (0.10, 0.55, 0.55),
    "pink": (0.95, 0.55, 0.70),
}
ACCENT_COLOURS = {
    **BODY_COLOURS,
    "gold": (0.85, 0.68, 0.20),
    "silver": (0.75, 0.77, 0.80),
    "navy": (0.08, 0.12, 0.35),
    "brown": (0.45, 0.28, 0.12),
}
# Printed details need this RGB distance from what they are printed on.
MIN_CONTRAST = 0.4
# Half the frame height in object units; products are 1.0-1.45 units tall.
VIEW_HALF_EXTENT = 1.0
# Rays start this far in front of the object, beyond its bounds.
RAY_START = 10.0


@dataclass(frozen=True)
class Design:
    """One product class: shape, size and printed design."""

    name: str
    shape: str
    width: float
    depth: float
    height: float
    body: tuple[float, float, float]
    stripe_colour: tuple[float, float, float]
    stripe_orientation: str
    stripe_count: int
    stripe_duty: float
    mark_shape: str
    mark_colour: tuple[float, float, float]
    mark_u: float
    mark_v: float
    mark_radius: float
    lid: tuple[float, float, float]

    @property
    def signature(self) -> tuple:
        """What tells this design apart from the side (the lid is extra)."""
        return (self.shape, self.body, self.stripe_colour, self.stripe_orientation,
                self.stripe_count, self.mark_shape, self.mark_colour)


@dataclass(frozen=True)
class _Piece:
    """A part of a product: ray intersection, surface paint and glossiness.

    intersect(origins, direction, to_camera) gives per ray the distance to the
    visible surface (inf on a miss) and an outward normal, not yet unit length;
    paint(points, unit_normals) gives the albedo there.
    """

    intersect: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    paint: Callable[[np.ndarray, np.ndarray], np.ndarray]
    gloss: float


# ---------------------------------------------------------------- designs

def class_designs(classes: int, seed: int) -> list[Design]:
    """The `classes` distinct product designs for `seed`, in class order."""
    rng = np.random.default_rng([seed, 0])
    body_count = min(len(BODY_COLOURS), max(2, classes // 3))
    body_names = [str(name) for name in rng.permutation(list(BODY_COLOURS))[:body_count]]
    digits = max(2, len(str(classes - 1)))
    designs: list[Design] = []
    seen: set[tuple] = set()
    for index in range(classes):
        # Shapes cycle every 3 classes and body colours every 2*body_count,
        # so shapes and colours are shared and some pairs share both.
        shape = SHAPES[index % len(SHAPES)]
        body_name = body_names[(index // 2) % body_count]
        design = _random_design(rng, f"{index:0{digits}d}", shape, body_name)
        while design.signature in seen:
            design = _random_design(rng, f"{index:0{digits}d}", shape, body_name)
        seen.add(design.signature)
        designs.append(design)
    return designs


def _random_design(rng: np.random.Generator, number: str, shape: str, body_name: str) -> Design:
    """Draw size and print of one product with the given shape and body colour."""
    body = BODY_COLOURS[body_name]
    stripe = _contrasting_colour(rng, [body])
    orientation = STRIPE_ORIENTATIONS[rng.integers(len(STRIPE_ORIENTATIONS))]
    width, depth, height = _random_dimensions(rng, shape)
    return Design(
        name=f"{shape}_{body_name}_{orientation}_{number}",
        shape=shape, width=width, depth=depth, height=height,
        body=body,
        stripe_colour=stripe,
        stripe_orientation=orientation,
        stripe_count=int(rng.integers(1, 5)),
        stripe_duty=float(rng.uniform(0.25, 0.45)),
        mark_shape=MARK_SHAPES[rng.integers(len(MARK_SHAPES))],
        mark_colour=_contrasting_colour(rng, [body, stripe]),
        mark_u=float(rng.uniform(0.35, 0.65)),
        mark_v=float(rng.uniform(0.35, 0.65)),
        mark_radius=float(rng.uniform(0.10, 0.15)),
        lid=_contrasting_colour(rng, []),
    )


def _random_dimensions(rng: np.random.Generator, shape: str) -> tuple[float, float, float]:
    """Width, depth and height in object units, varied a little per class."""
    if shape == "box":
        return float(rng.uniform(0.7, 0.9)), float(rng.uniform(0.4, 0.6)), float(rng.uniform(1.1, 1.3))
    low, high = (0.66, 0.84) if shape == "can" else (0.56, 0.68)
    diameter = float(rng.uniform(low, high))
    height = float(rng.uniform(0.95, 1.2) if shape == "can" else rng.uniform(1.3, 1.45))
    return diameter, diameter, height


def _contrasting_colour(rng: np.random.Generator, against: list) -> tuple[float, float, float]:
    """An accent colour far enough from every colour in `against`."""
    candidates = [colour for colour in ACCENT_COLOURS.values()
                  if all(np.linalg.norm(np.subtract(colour, other)) >= MIN_CONTRAST for other in against)]
    return candidates[rng.integers(len(candidates))]


# ---------------------------------------------------------------- geometry

def _box_pieces(design: Design) -> list[_Piece]:
    """A carton standing on y=0."""
    half = np.array([design.width / 2, 0.0, design.depth / 2])
    low, high = -half, half + [0.0, design.height, 0.0]
    return [_Piece(partial(_hit_box, low, high), partial(_paint_box, design), gloss=0.05)]


def _can_pieces(design: Design) -> list[_Piece]:
    """A cylinder with a printed side and a coloured lid."""
    radius, height = design.width / 2, design.height
    return [
        _Piece(partial(_hit_frustum, 0.0, height, radius, radius),
               partial(_paint_cylinder_label, design, 0.0, height, radius), gloss=0.5),
        _Piece(partial(_hit_disc, height, radius), partial(_paint_lid_top, design, radius), gloss=0.5),
    ]


def _bottle_pieces(design: Design) -> list[_Piece]:
    """A labelled body, a conical shoulder, a narrow neck and a cap."""
    radius, height = design.width / 2, design.height
    shoulder, neck_start, cap_start = 0.55 * height, 0.72 * height, 0.86 * height
    neck_radius, cap_radius = 0.38 * radius, 0.45 * radius
    body_colour = partial(_paint_plain, design.body)
    return [
        _Piece(partial(_hit_frustum, 0.0, shoulder, radius, radius),
               partial(_paint_cylinder_label, design, 0.0, shoulder, radius), gloss=0.35),
        _Piece(partial(_hit_frustum, shoulder, neck_start, radius, neck_radius), body_colour, gloss=0.35),
        _Piece(partial(_hit_frustum, neck_start, cap_start, neck_radius, neck_radius), body_colour, gloss=0.35),
        _Piece(partial(_hit_frustum, cap_start, height, cap_radius, cap_radius),
               partial(_paint_plain, design.lid), gloss=0.2),
        _Piece(partial(_hit_disc, height, cap_radius), partial(_paint_lid_top, design, cap_radius), gloss=0.2),
    ]


PIECES_BY_SHAPE = {"box": _box_pieces, "can": _can_pieces, "bottle": _bottle_pieces}


def _hit_box(low, high, origins, direction, to_camera):
    """Slab test: distance to an axis-aligned box and the entry face normal."""
    del to_camera  # the entry face of a box always faces the camera
    safe = np.where(np.abs(direction) < 1e-9, 1e-9, direction)
    t_low, t_high = (low - origins) / safe, (high - origins) / safe
    t_near, t_far = np.minimum(t_low, t_high), np.maximum(t_low, t_high)
    entry_axis = t_near.argmax(axis=1)
    t_in, t_out = t_near.max(axis=1), t_far.min(axis=1)
    normals = np.zeros_like(origins)
    normals[np.arange(len(origins)), entry_axis] = -np.sign(safe[entry_axis])
    return np.where(t_in <= t_out, t_in, np.inf), normals


def _hit_frustum(y0, y1, r0, r1, origins, direction, to_camera):
    """Distance to the side of a cone frustum around the y axis, and its normals."""
    slope = (r1 - r0) / (y1 - y0)
    ox, oy, oz = origins.T
    dx, dy, dz = direction
    radius_at_origin = r0 + slope * (oy - y0)
    a = dx * dx + dz * dz - slope * slope * dy * dy
    a = a if abs(a) > 1e-9 else 1e-9
    b = 2 * (ox * dx + oz * dz - slope * radius_at_origin * dy)
    c = ox * ox + oz * oz - radius_at_origin ** 2
    discriminant = b * b - 4 * a * c
    root = np.sqrt(np.maximum(discriminant, 0.0))
    best_t = np.full(len(origins), np.inf)
    best_normals = np.zeros_like(origins)
    # Either root can be the visible one: the other may lie on the mirrored
    # cone or on the far side, which the range and facing checks reject.
    for t in ((-b - root) / (2 * a), (-b + root) / (2 * a)):
        points = origins + t[:, None] * direction
        # Gradient of hypot(x, z) - radius(y), times hypot(x, z); _trace normalises.
        normals = points * [1.0, 0.0, 1.0]
        normals[:, 1] = -slope * np.hypot(points[:, 0], points[:, 2])
        valid = ((discriminant >= 0) & (t > 0) & (t < best_t)
                 & (points[:, 1] >= y0) & (points[:, 1] <= y1) & (normals @ to_camera > 0))
        best_t = np.where(valid, t, best_t)
        best_normals[valid] = normals[valid]
    return best_t, best_normals


def _hit_disc(y, radius, origins, direction, to_camera):
    """Distance to an upward-facing disc of `radius` at height `y`."""
    normals = np.tile([0.0, 1.0, 0.0], (len(origins), 1))
    if to_camera[1] <= 1e-9:  # seen edge-on or from below: invisible
        return np.full(len(origins), np.inf), normals
    t = (y - origins[:, 1]) / direction[1]
    points = origins + t[:, None] * direction
    inside = points[:, 0] ** 2 + points[:, 2] ** 2 <= radius * radius
    return np.where(inside, t, np.inf), normals


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length one (zero rows stay zero)."""
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(length == 0, 1.0, length)


# ---------------------------------------------------------------- paint

def _paint_plain(colour, points, normals):
    """One colour everywhere."""
    del normals
    return np.tile(colour, (len(points), 1))


def _paint_box(design: Design, points, normals):
    """Printed label on the four sides, lid colour on top."""
    x, y, z = points.T
    half_w, half_d = design.width / 2, design.depth / 2
    # Panels 0..3 = front, right, back, left, each read left to right from outside.
    panel = np.select([normals[:, 2] > 0.5, normals[:, 0] > 0.5, normals[:, 2] < -0.5], [0, 1, 2], 3)
    across = np.select([panel == 0, panel == 1, panel == 2], [x + half_w, half_d - z, half_w - x], z + half_d)
    panel_width = np.where(panel % 2 == 0, design.width, design.depth)
    albedo = _label(design, panel, across, y, panel_width, design.height)
    top = normals[:, 1] > 0.5
    albedo[top] = _paint_box_top(design, x[top], z[top])
    return albedo


def _paint_box_top(design: Design, x, z):
    """Lid colour with darker edges where the carton flaps fold."""
    margin = 0.05
    at_edge = (np.abs(x) > design.width / 2 - margin) | (np.abs(z) > design.depth / 2 - margin)
    return np.asarray(design.lid) * np.where(at_edge, 0.75, 1.0)[:, None]


def _paint_cylinder_label(design: Design, y0, y1, radius, points, normals):
    """Printed label wrapped round a cylinder as four panels like a box's sides."""
    del normals
    quarter_turns = np.arctan2(points[:, 0], points[:, 2]) / (np.pi / 2) + 0.5
    panel = np.floor(quarter_turns).astype(int) % 4
    panel_width = np.pi / 2 * radius
    across = (quarter_turns - np.floor(quarter_turns)) * panel_width
    return _label(design, panel, across, points[:, 1] - y0, panel_width, y1 - y0)


def _paint_lid_top(design: Design, radius, points, normals):
    """Lid colour with a darker rim."""
    del normals
    rim = np.hypot(points[:, 0], points[:, 2]) > 0.8 * radius
    return np.asarray(design.lid) * np.where(rim, 0.7, 1.0)[:, None]


def _label(design: Design, panel, across, up, panel_width, label_height):
    """Body colour, stripes, and the mark on front and back panels."""
    albedo = np.tile(design.body, (len(panel), 1))
    albedo[_stripe_mask(design, across, up, panel_width, label_height)] = design.stripe_colour
    # The mark is on the back too, so most azimuths show it.
    du = across - design.mark_u * panel_width
    dv = up - design.mark_v * label_height
    on_mark = _mark_mask(design.mark_shape, du, dv, design.mark_radius) & (panel % 2 == 0)
    albedo[on_mark] = design.mark_colour
    return albedo


def _stripe_mask(design: Design, across, up, panel_width, label_height):
    """Where the stripes are, in physical label coordinates."""
    count = design.stripe_count
    if design.stripe_orientation == "hstripes":
        phase = up / (label_height / count)
    elif design.stripe_orientation == "vstripes":
        phase = across / (panel_width / count)
    else:
        phase = (across + up) / (label_height / count)
    return phase - np.floor(phase) < design.stripe_duty


def _mark_mask(shape: str, du, dv, radius):
    """Where a mark of `shape` centred at the origin covers the label."""
    if shape == "disc":
        return du * du + dv * dv < radius * radius
    if shape == "square":
        return np.maximum(np.abs(du), np.abs(dv)) < 0.85 * radius
    if shape == "triangle":
        return (dv > -0.6 * radius) & (np.abs(du) < (radius - dv) * 0.62)
    arm = radius / 3
    return ((np.abs(du) < arm) & (np.abs(dv) < radius)) | ((np.abs(dv) < arm) & (np.abs(du) < radius))


# ---------------------------------------------------------------- rendering

def render_view(design: Design, azimuth_deg: float, elevation_deg: float, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """Render one photo of `design` as a (size, size, 3) uint8 array."""
    resolution = 2 * size  # supersampled, box-filtered down at the end
    to_camera, right, up = _camera_axes(azimuth_deg, elevation_deg)
    scale = rng.uniform(0.85, 1.1)
    offset = rng.uniform(-0.08, 0.08, size=2)
    centres = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    screen_x, screen_y = np.meshgrid(centres * VIEW_HALF_EXTENT / scale, -centres * VIEW_HALF_EXTENT / scale)
    screen_x, screen_y = screen_x - offset[0], screen_y - offset[1]
    look_at = np.array([0.0, design.height / 2, 0.0])
    origins = (look_at + screen_x.reshape(-1, 1) * right + screen_y.reshape(-1, 1) * up
               + RAY_START * to_camera)

    image = _background(rng, screen_x, screen_y)
    image *= _contact_shadow(design, look_at, right, up, elevation_deg, screen_x, screen_y)[..., None]
    t, normals, albedo, gloss = _trace(design, origins, -to_camera, to_camera)
    hit = np.isfinite(t).reshape(resolution, resolution)
    image[hit] = _shade(rng, albedo, normals, gloss, to_camera, right, azimuth_deg)

    image = image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    image += rng.normal(0.0, rng.uniform(0.0, 0.012), size=image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _camera_axes(azimuth_deg: float, elevation_deg: float):
    """Unit vectors toward the camera, screen right and screen up, in object coordinates."""
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    to_camera = np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])
    right = np.array([np.cos(a), 0.0, -np.sin(a)])
    up = np.array([-np.sin(a) * np.sin(e), np.cos(e), -np.cos(a) * np.sin(e)])
    return to_camera, right, up


def _trace(design: Design, origins, direction, to_camera):
    """Nearest hit over all pieces: distance, normal, albedo and gloss per ray."""
    pieces = PIECES_BY_SHAPE[design.shape](design)
    hits = [piece.intersect(origins, direction, to_camera) for piece in pieces]
    distances = np.stack([t for t, _ in hits])
    nearest = distances.argmin(axis=0)
    t = distances[nearest, np.arange(len(origins))]
    hit = np.isfinite(t)
    points = origins[hit] + t[hit, None] * direction
    normals = np.zeros((len(points), 3))
    albedo = np.zeros((len(points), 3))
    gloss = np.zeros(len(points))
    for index, (piece, (_, piece_normals)) in enumerate(zip(pieces, hits)):
        mine = nearest[hit] == index
        normals[mine] = _unit(piece_normals[hit][mine])
        albedo[mine] = piece.paint(points[mine], normals[mine])
        gloss[mine] = piece.gloss
    return t, normals, albedo, gloss


def _shade(rng, albedo, normals, gloss, to_camera, right, azimuth_deg):
    """Lambert plus a specular highlight, from a light above and to the front-left."""
    a = np.radians(azimuth_deg)
    camera_side = np.array([np.sin(a), 0.0, np.cos(a)])
    light = _unit(-0.5 * right + 0.9 * np.array([0.0, 1.0, 0.0]) + 0.7 * camera_side
                  + rng.normal(0.0, 0.2, size=3))
    ambient = rng.uniform(0.3, 0.45)
    brightness = rng.uniform(0.85, 1.1)
    diffuse = np.clip(normals @ light, 0.0, None)
    halfway = _unit(light + to_camera)
    specular = gloss * np.clip(normals @ halfway, 0.0, None) ** 30
    return albedo * (ambient + (1 - ambient) * diffuse)[:, None] * brightness + specular[:, None]


def _background(rng, screen_x, screen_y):
    """A muted random colour with a soft gradient and mild noise."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.08, 0.3), rng.uniform(0.45, 0.85)
    colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value))
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (screen_x * np.cos(angle) + screen_y * np.sin(angle)) / np.abs(screen_x).max()
    shading = 1 + rng.uniform(0.05, 0.15) * gradient + rng.normal(0.0, 0.02, size=screen_x.shape)
    return colour * shading[..., None]


def _contact_shadow(design: Design, look_at, right, up, elevation_deg, screen_x, screen_y):
    """Darkening factor of a soft shadow around the product's footprint."""
    base_x, base_y = -look_at @ right, -look_at @ up
    radius_x = 0.6 * max(design.width, design.depth)
    radius_y = radius_x * max(np.sin(np.radians(elevation_deg)), 0.15)
    distance = ((screen_x - base_x) / radius_x) ** 2 + ((screen_y - base_y) / radius_y) ** 2
    return 1 - 0.4 * np.exp(-2 * distance)


# ---------------------------------------------------------------- data set

def generate_demo(out_dir, *, classes: int = 10, train_per_class: int = 16, test_per_class: int = 12,
                  size: int = 64, seed: int = 0) -> dict:
    """Write the demo image set to `out_dir` and return a summary of it."""
    _check_at_least("classes", classes, 2)
    _check_at_least("train_per_class", train_per_class, 2)
    _check_at_least("test_per_class", test_per_class, 1)
    _check_at_least("size", size, 16)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: already exists and is not empty; "
                              "remove it or choose another directory for the demo set")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    designs = class_designs(classes, seed)
    # Built beside the target and renamed at the end, so an interrupted run
    # never leaves a half-written set under the real name.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_train(staging / "train", designs, train_per_class, size, seed)
        _write_test(staging / "test", designs, test_per_class, size, seed)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; fails if someone filled it since
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"classes": classes, "train_images": classes * train_per_class,
            "test_images": classes * test_per_class, "size": size, "path": str(out_dir)}


def _check_at_least(name: str, value, minimum: int) -> None:
    """Raise ValueError naming `name` unless `value` is an integer >= `minimum`."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name}: the value is {value!r}, but must be an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}: the value is {value}, but must be >= {minimum}")


def _views(rng: np.random.Generator, count: int, elevations: tuple[float, ...]) -> list[tuple[float, float]]:
    """(azimuth, elevation) pairs: elevations round robin, azimuths spread over a full turn."""
    start = rng.uniform(0, 360)
    jitter = rng.uniform(0, 1, size=count)
    return [((start + (n + jitter[n]) * 360 / count) % 360, elevation)
            for n, elevation in enumerate(_elevations(count, elevations))]


def _render_class(design: Design, class_index: int, count: int, elevations, size: int, seed: int, split: int):
    """The `count` images of one class in one split, as uint8 arrays."""
    # Own generator per class and split: images do not depend on write order.
    rng = np.random.default_rng([seed, split, class_index])
    return [render_view(design, azimuth, elevation, size, rng)
            for azimuth, elevation in _views(rng, count, elevations)]


def _write_train(train_dir: Path, designs: list[Design], per_class: int, size: int, seed: int) -> None:
    """One folder of images per class, at the training elevations, and beside it the manifest train.csv
    (path,label,elevation), whose elevation column data.val_groups can hold out."""
    rows = []
    for class_index, design in enumerate(designs):
        class_dir = train_dir / design.name
        class_dir.mkdir(parents=True)
        images = _render_class(design, class_index, per_class, TRAIN_ELEVATIONS, size, seed, split=1)
        for n, (pixels, elevation) in enumerate(zip(images, _elevations(per_class, TRAIN_ELEVATIONS))):
            Image.fromarray(pixels).save(class_dir / f"{n:04d}.png")
            rows.append((f"{train_dir.name}/{design.name}/{n:04d}.png", design.name, f"{elevation:g}"))
    with open(train_dir.parent / TRAIN_MANIFEST, "w", newline="") as manifest:
        writer = csv.writer(manifest)
        writer.writerow(["path", "label", "elevation"])
        writer.writerows(rows)


def _elevations(count: int, elevations: tuple[float, ...]) -> list[float]:
    """The elevation of each of `count` views, as _views assigns them."""
    return [elevations[n % len(elevations)] for n in range(count)]


def _write_test(test_dir: Path, designs: list[Design], per_class: int, size: int, seed: int) -> None:
    """Shuffled, label-free file names plus test_labels.csv, at all test elevations."""
    test_dir.mkdir(parents=True)
    numbers = np.random.default_rng([seed, 3]).permutation(len(designs) * per_class)
    rows = []
    for class_index, design in enumerate(designs):
        images = _render_class(design, class_index, per_class, TEST_ELEVATIONS, size, seed, split=2)
        for n, pixels in enumerate(images):
            file_name = f"test_{numbers[class_index * per_class + n]:05d}.png"
            Image.fromarray(pixels).save(test_dir / file_name)
            rows.append((file_name, design.name))
    with open(test_dir / "test_labels.csv", "w", newline="") as labels:
        writer = csv.writer(labels)
        writer.writerow(["file", "label"])
        writer.writerows(sorted(rows))
