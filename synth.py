"""
The synthetic multi-camera robot world of nanocosmos: scene, physics, renderer and the writer of the dataset.

Owns: World (the steppable physics: reset to episode i's first scene, one frame per pose or per action, every
camera rendered), simulate_episode (World under a random, smooth 6-DoF motion that pushes and carries cubes), the
camera rig and ray-cast renderer, and make_synthetic, which writes data.py's camera-folder layout:
annotations/{train,val}/epNNNNN.json (state, continuous_gripper_state, action stored like Bridge, texts),
videos/cam<k>/epNNNNN.mp4 and synth.json. Episode i depends only on (seed, i).
Must not: read datasets or define the action convention (both are data.py's), or import scripts (sample, evaluate,
train, policy). Runs on the CPU in worker processes.

    python synth.py --out datasets/synth [--episodes 100] [--val-episodes N] [--cameras 4] [--frames 40] \
        [--size 128x160]
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from configurator import UserError
from data import euler_to_rotm, relative_actions, rotm_to_euler
from video import progress, write_mp4

# A table, a big gripper with a red fin, cubes it pushes and carries: oriented boxes ray cast per pixel, Lambert
# shading, soft contact shadows. World frame: z up, table top at z = 0, metres. Made for a tiny model at 64x80:
# the gripper covers a tenth of every view, its yaw stays within +-0.6 rad (an action in its own frame moves it the
# same way on screen) and the motion is random, so only the actions tell where it goes.

TABLE_HALF = 0.45                                 # the table top is |x|, |y| < TABLE_HALF
WORK_LO, WORK_HI = np.array([-0.13, -0.13, 0.045]), np.array([0.13, 0.13, 0.17])  # where the tool centre may go
LIGHT = np.array([0.35, 0.25, 1.0]) / np.linalg.norm([0.35, 0.25, 1.0])
AMBIENT, DIFFUSE = 0.38, 0.62
OPEN_GAP, CLOSED_GAP = 0.10, 0.02                 # distance between the fingers' inner faces
FINGER_HALF = np.array([0.02, 0.012, 0.036])
# End-effector parts in its own frame: x forward (the red fin), y across the fingers, z up (the fingers hang down
# at roll = pitch = 0). The pose in `state` is the tool centre point, between the fingers' centres.
EE_PARTS = [  # (centre, half extents, colour); the two fingers are added per frame because they move
    ((0.0, 0.0, 0.05), (0.045, 0.075, 0.016), (0.16, 0.22, 0.55)),    # palm
    ((0.0, 0.0, 0.105), (0.026, 0.026, 0.04), (0.55, 0.58, 0.66)),     # wrist
    ((0.08, 0.0, 0.05), (0.04, 0.012, 0.014), (0.92, 0.12, 0.08)),     # fin
]
FINGER_COLOUR = (0.08, 0.08, 0.1)
OBJECT_COLOURS = {"green": (0.15, 0.72, 0.22), "yellow": (0.96, 0.8, 0.1), "white": (0.95, 0.95, 0.95),
                  "magenta": (0.82, 0.2, 0.72), "cyan": (0.1, 0.78, 0.82), "orange": (1.0, 0.52, 0.1)}
CAMERA_FOV = 40.0                                 # horizontal field of view, degrees
# the motion: piecewise random velocity goals (segments of SEGMENT frames), eased into so the path is smooth
SPEED = (0.01, 0.045)                             # m per frame: 0.2 .. 0.9 after the x20 action scale
YAW_RATE = 0.12                                   # rad per frame, at most
YAW_LIMIT = 0.6                                   # |yaw| stays below this (soft)
SEGMENT = (3, 8)                                  # frames per velocity goal
EASE = 0.4                                        # velocity moves this fraction of the way to its goal each frame
TOGGLE = 0.08                                     # chance per frame of flipping the gripper command (after 4 frames)
_CAMERAS = {}                                     # per process: the rig of each (camera, size), built once


def make_camera(k, size, target=(0.0, 0.0, 0.11)):
    """Camera k of a fixed rig around the workspace: front, left, right, top, then oblique views. Cached: camera."""
    presets = [(0.0, 55, 0.7), (90.0, 52, 0.7), (-90.0, 52, 0.7), (180.0, 80.0, 0.72)]
    azimuth, elevation, distance = presets[k] if k < len(presets) else (45.0 + 90.0 * (k - len(presets)), 50.0, 0.7)
    az, el = math.radians(azimuth), math.radians(elevation)
    target = np.array(target)
    origin = target + distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = (target - origin) / np.linalg.norm(target - origin)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    H, W = size
    focal = 0.5 * W / math.tan(math.radians(CAMERA_FOV) / 2)
    u = (np.arange(W) + 0.5 - W / 2) / focal
    v = (np.arange(H) + 0.5 - H / 2) / focal
    rays = forward + u[None, :, None] * right + v[:, None, None] * down
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    cam = dict(origin=origin, forward=forward, right=right, down=down, focal=focal, size=(H, W),
               rays=np.ascontiguousarray(rays.transpose(2, 0, 1)))  # channel-first planes keep numpy's inner loops long
    # the static picture (table, floor, wall) and its depth
    dz = rays[..., 2]
    t_table = np.where(dz < 0, -origin[2] / np.minimum(dz, -1e-9), np.inf)
    xy = origin[:2] + t_table[..., None] * rays[..., :2]
    on_table = np.isfinite(t_table) & (np.abs(xy) < TABLE_HALF).all(-1)
    checker = (np.floor(xy[..., 0] / 0.1) + np.floor(xy[..., 1] / 0.1)) % 2
    wood = np.where(checker[..., None] > 0, [0.80, 0.71, 0.58], [0.71, 0.62, 0.50])
    wood = np.where((np.abs(xy) > TABLE_HALF - 0.02).any(-1)[..., None], [0.45, 0.36, 0.28], wood)  # table rim
    t_floor = np.where(dz < 0, (-0.75 - origin[2]) / np.minimum(dz, -1e-9), np.inf)
    floor_xy = origin[:2] + t_floor[..., None] * rays[..., :2]
    on_floor = np.isfinite(t_floor) & (np.abs(floor_xy) < 3.0).all(-1)
    wall = (0.55 + 0.25 * np.clip(dz, -1, 1))[..., None] * np.array([0.8, 0.88, 1.0])
    image = np.where(on_table[..., None], wood * (AMBIENT + DIFFUSE * LIGHT[2]),
                     np.where(on_floor[..., None], [0.33, 0.33, 0.36], wall))
    xy = np.where(on_table[..., None], xy, 1e3)  # off the table: too far from anything to be shadowed
    cam.update(background=np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32),
               depth=np.where(on_table, t_table, np.inf).astype(np.float32),
               table_x=xy[..., 0].astype(np.float32), table_y=xy[..., 1].astype(np.float32))
    return cam


def project(cam, points_N_3):
    """World points -> (row, col) pixel coordinates and depth along the view axis."""
    q = points_N_3 - cam["origin"]
    z = np.maximum(q @ cam["forward"], 1e-6)
    H, W = cam["size"]
    col = cam["focal"] * (q @ cam["right"]) / z + W / 2 - 0.5
    row = cam["focal"] * (q @ cam["down"]) / z + H / 2 - 0.5
    return row, col, z


def screen_rect(cam, points_N_3, margin=1):
    """The pixel rectangle (r0, r1, c0, c1) covering some world points, clipped to the image (may be empty)."""
    row, col, _ = project(cam, points_N_3)
    H, W = cam["size"]
    return (max(int(row.min()) - margin, 0), min(int(row.max()) + 2 + margin, H),
            max(int(col.min()) - margin, 0), min(int(col.max()) + 2 + margin, W))


BOX_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def draw_boxes(cam, image, depth, centre, R, offsets_B_3, halves_B_3, colours_B_3):
    """Ray-cast boxes that are axis-aligned in one rigid frame (centre, R) into image [3,H,W] and depth, in place."""
    corners = (offsets_B_3[:, None] + BOX_CORNERS[None] * halves_B_3[:, None]).reshape(-1, 3)
    r0, r1, c0, c1 = screen_rect(cam, centre + corners @ R.T)
    if r0 >= r1 or c0 >= c1:
        return
    d_3_P = (R.T @ cam["rays"][:, r0:r1, c0:c1].reshape(3, -1)).astype(np.float32)  # rays in the boxes' frame
    inv_3_P = 1.0 / np.where(np.abs(d_3_P) < 1e-9, np.float32(1e-9), d_3_P)
    o_B_3 = ((cam["origin"] - centre) @ R - offsets_B_3).astype(np.float32)  # the camera in each box's frame
    h_B_3 = halves_B_3.astype(np.float32)
    # slab test one axis at a time on [B,P] arrays: the entry distance is the largest per-axis entry
    t_near = t_far = axis = None
    for k in range(3):
        t1 = (-h_B_3[:, k:k + 1] - o_B_3[:, k:k + 1]) * inv_3_P[k]
        t2 = (h_B_3[:, k:k + 1] - o_B_3[:, k:k + 1]) * inv_3_P[k]
        t_in, t_out = np.minimum(t1, t2), np.maximum(t1, t2)
        if k == 0:
            t_near, t_far, axis = t_in, t_out, np.zeros(t_in.shape, dtype=np.int64)
        else:
            axis = np.where(t_in > t_near, k, axis)
            t_near, t_far = np.maximum(t_near, t_in), np.minimum(t_far, t_out)
    t_B_P = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    b = t_B_P.argmin(0)
    P = np.arange(len(b))
    t = t_B_P[b, P]
    rows, cols = np.divmod(P, c1 - c0)
    rows, cols = rows + r0, cols + c0
    visible = t < depth[rows, cols]
    if not visible.any():
        return
    p, b, rows, cols = P[visible], b[visible], rows[visible], cols[visible]
    ax = axis[b, p]
    facing = -np.sign(d_3_P[ax, p]) * (LIGHT @ R)[ax]  # the hit face's outward normal . light
    image[:, rows, cols] = colours_B_3[b].T * (AMBIENT + DIFFUSE * np.maximum(facing, 0.0))
    depth[rows, cols] = t[visible]


def camera(k, size):
    if (k, tuple(size)) not in _CAMERAS:
        _CAMERAS[(k, tuple(size))] = make_camera(k, tuple(size))
    return _CAMERAS[(k, tuple(size))]


def finger_offsets(gap):
    y = 0.5 * gap + FINGER_HALF[1]
    return np.array([[0.0, y, 0.0], [0.0, -y, 0.0]])


def render(cam, ee_pose, gap, objects):
    """One frame, uint8 [H,W,3]. ee_pose = (p, R); objects = list of dicts with centre, R, half, colour."""
    p, R = ee_pose
    image, depth = cam["background"].copy(), cam["depth"].copy()
    # soft contact shadows: the light is nearly overhead, a blob under each thing that fades with height
    casters = [(p[:2], 0.06 + 0.25 * p[2], 0.55 * math.exp(-p[2] / 0.25))]
    casters += [(o["centre"][:2], 1.5 * o["half"][0] + 0.25 * (o["centre"][2] - o["half"][2]),
                 0.55 * math.exp(-(o["centre"][2] - o["half"][2]) / 0.25)) for o in objects]
    for xy, radius, strength in casters:
        reach = 2.5 * radius  # exp(-6) is invisible
        r0, r1, c0, c1 = screen_rect(cam, np.array([[xy[0] + sx * reach, xy[1] + sy * reach, 0.0]
                                                    for sx in (-1, 1) for sy in (-1, 1)]))
        if r0 < r1 and c0 < c1:
            dx, dy = cam["table_x"][r0:r1, c0:c1] - np.float32(xy[0]), cam["table_y"][r0:r1, c0:c1] - np.float32(xy[1])
            fade = np.exp((dx * dx + dy * dy) * np.float32(-1 / radius ** 2))
            image[:, r0:r1, c0:c1] *= 1.0 - np.float32(strength) * fade
    for o in objects:
        draw_boxes(cam, image, depth, o["centre"], o["R"], np.zeros((1, 3)), o["half"][None], np.array([o["colour"]]))
    offsets = np.array([c for c, _, _ in EE_PARTS] + list(finger_offsets(gap)))
    halves = np.array([h for _, h, _ in EE_PARTS] + [FINGER_HALF, FINGER_HALF])
    colours = np.array([c for _, _, c in EE_PARTS] + [FINGER_COLOUR, FINGER_COLOUR])
    draw_boxes(cam, image, depth, p, R, offsets, halves, colours)
    image = (image * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def rot_z(yaw):
    return euler_to_rotm([0.0, 0.0, yaw])


def wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def yaw_of(R):
    return math.atan2(R[1, 0], R[0, 0])


def random_direction(rng, z_weight=0.6):
    d = rng.normal(size=3) * [1.0, 1.0, z_weight]
    return d / max(np.linalg.norm(d), 1e-9)


def place_objects(rng, num_objects):
    """Cubes of distinct colours at random places on the table, at least 10 cm apart where possible."""
    objects = []
    for name in rng.choice(list(OBJECT_COLOURS), size=num_objects, replace=False):
        half = rng.uniform(0.024, 0.034)
        for _ in range(50):
            xy = rng.uniform(WORK_LO[:2], WORK_HI[:2])
            if all(np.linalg.norm(xy - q["centre"][:2]) > 0.1 for q in objects):
                break
        objects.append(dict(name=str(name), colour=OBJECT_COLOURS[name], half=np.full(3, half),
                            centre=np.array([xy[0], xy[1], half]), R=rot_z(rng.uniform(-np.pi, np.pi))))
    return objects


def try_grasp(objects, p, R, texts):
    """The index of the cube between the closing fingers (its grip recorded), or None."""
    for i, o in enumerate(objects):
        c = R.T @ (o["centre"] - p)
        if abs(c[0]) < FINGER_HALF[0] + 0.01 and abs(c[1]) < 0.5 * OPEN_GAP - 0.8 * o["half"][1] and abs(c[2]) < 0.035:
            o["grip"] = (c, R.T @ o["R"])
            texts.append(f"pick up the {o['name']} cube")
            return i
    return None


def move_cubes(objects, held, p, R, gap, texts):
    """One frame of the cubes (in place): the held one rides with the fingers, the others fall, are shoved by low
    fingers and each other, and stay on the table."""
    for i, o in enumerate(objects):
        if i == held:
            c, R_rel = o["grip"]
            o["centre"], o["R"] = p + R @ c, R @ R_rel
            continue
        o["centre"][2] = max(o["half"][2], o["centre"][2] - 0.04)  # falling
        if p[2] - FINGER_HALF[2] < 2 * o["half"][2]:  # fingers low enough to shove the cube
            for f in finger_offsets(gap):
                f_xy = (p + R @ f)[:2]
                d = o["centre"][:2] - f_xy
                reach = FINGER_HALF[0] + 1.2 * o["half"][0]
                if np.linalg.norm(d) < reach:
                    o["centre"][:2] = f_xy + d / max(np.linalg.norm(d), 1e-9) * reach
                    if not texts or texts[-1] != f"push the {o['name']} cube":
                        texts.append(f"push the {o['name']} cube")
    for i, o in enumerate(objects):
        for j in range(i + 1, len(objects)):
            q = objects[j]
            d = q["centre"][:2] - o["centre"][:2]
            reach = 1.2 * (o["half"][0] + q["half"][0])
            if held not in (i, j) and np.linalg.norm(d) < reach:
                shift = 0.5 * (reach - np.linalg.norm(d)) * d / max(np.linalg.norm(d), 1e-9)
                o["centre"][:2] -= shift
                q["centre"][:2] += shift
        if i != held:
            o["centre"][:2] = np.clip(o["centre"][:2], -TABLE_HALF + o["half"][0], TABLE_HALF - o["half"][0])


class World:
    """The steppable world: the end effector's pose (p, rpy), gripper (g 0 open .. 1 closed, command 1 = close),
    the cubes. step() moves it one frame; act() does so under one action of data.py's convention; render() draws
    every camera. The dataset's episodes are World under simulate_episode's random motion."""

    def __init__(self, objects, p, rpy):
        self.objects, self.p, self.rpy = objects, p, rpy
        self.g, self.command, self.held, self.texts = 0.0, 0, None, []
        self.settle()

    @classmethod
    def episode(cls, seed, index, objects=(1, 3)):
        """The first scene of episode `index` of a dataset written with `seed` and `objects` (synth.json)."""
        rng = np.random.default_rng([seed, index])
        return cls(*initial_scene(rng, int(rng.integers(objects[0], objects[1] + 1))))

    def step(self, p, rpy, command):
        """One frame: the end effector moved to (p, rpy); the gripper eases towards command; grasp, drop, cubes."""
        self.p, self.rpy, self.command = p, rpy, command
        self.g += float(np.clip(command - self.g, -0.34, 0.34))
        R = euler_to_rotm(rpy)
        if command == 1 and self.held is None and self.g < 0.7:  # closing on a cube between the fingers grasps it
            self.held = try_grasp(self.objects, p, R, self.texts)
        if command == 0 and self.held is not None:  # opening drops it; it lands upright
            self.objects[self.held]["R"] = rot_z(yaw_of(self.objects[self.held]["R"]))
            self.held = None
        self.settle()

    def settle(self):
        R = euler_to_rotm(self.rpy)
        if self.held is not None:  # the fingers stop on the cube
            self.g = min(self.g, (OPEN_GAP - 2 * self.objects[self.held]["half"][1]) / (OPEN_GAP - CLOSED_GAP))
        gap = OPEN_GAP - self.g * (OPEN_GAP - CLOSED_GAP)
        move_cubes(self.objects, self.held, self.p, R, gap, self.texts)
        self.state = [*self.p, *self.rpy, 1.0 - self.command]
        self.scene = ((self.p.copy(), R), gap, [dict(centre=o["centre"].copy(), R=o["R"].copy(), half=o["half"],
                                                     colour=o["colour"]) for o in self.objects])

    def act(self, action, action_scale=20.0, gripper_scale=1.0):
        """One frame under a scaled action (data.compute_actions): translation and rotation in the end effector's
        frame, column 6 the gripper value to reach (command close above the current value, open below, else kept).
        The tool centre stays in the workspace."""
        a = np.asarray(action, dtype=np.float64)
        R = euler_to_rotm(self.rpy)
        p = np.clip(self.p + R @ (a[:3] / action_scale), WORK_LO, WORK_HI)
        target = a[6] / gripper_scale
        command = 1 if target > self.g + 0.05 else 0 if target < self.g - 0.05 else self.command
        self.step(p, rotm_to_euler(R @ euler_to_rotm(a[3:6] / action_scale)), command)

    def render(self, cameras, size):
        """uint8 [V, 3, H, W] of the current frame."""
        return np.stack([render(camera(k, size), *self.scene).transpose(2, 0, 1) for k in cameras])


def initial_scene(rng, num_objects):
    objects = place_objects(rng, num_objects)
    p = rng.uniform([WORK_LO[0], WORK_LO[1], 0.08], [WORK_HI[0], WORK_HI[1], WORK_HI[2] - 0.02])
    return objects, p, np.array([rng.normal(0, 0.1), rng.normal(0, 0.1), rng.uniform(-YAW_LIMIT, YAW_LIMIT)])


def simulate_episode(rng, frames, num_objects):
    """
    World under a random, smooth 6-DoF motion: the end effector eases toward a new random velocity goal (any
    direction, speed in SPEED, sometimes a pause, sometimes a dive at a cube) every 3-8 frames, turns and tilts,
    bounces off the workspace walls and flips its gripper at random (closing when a dive reaches its cube).
    Returns state [T,7] (x, y, z, roll, pitch, yaw, 1 = gripper commanded open, as Bridge), continuous gripper [T]
    (0 open .. 1 closed; it stops on a held cube), the scene of every frame, and texts.
    """
    world = World(*initial_scene(rng, num_objects))
    objects, p, rpy = world.objects, world.p, world.rpy
    v, v_goal, yaw_rate, yaw_goal, tilt_goal = np.zeros(3), np.zeros(3), 0.0, 0.0, rpy[:2].copy()
    command, dwell, dive, segment_left = 0, 0, None, 0
    states, grippers, scenes = [world.state], [world.g], [world.scene]
    for t in range(1, frames):
        if segment_left <= 0:  # a new random goal for the next few frames
            segment_left, dive = int(rng.integers(SEGMENT[0], SEGMENT[1] + 1)), None
            kind = rng.random()
            if kind < 0.12:
                v_goal, yaw_goal = np.zeros(3), 0.0
            elif kind < 0.35 and world.held is None and objects:
                dive = (int(rng.integers(len(objects))), rng.uniform(0.6, 1.0) * SPEED[1])
                segment_left = 12  # at most; reaching the cube ends it earlier
                if command == 1:
                    command, dwell = 0, 0  # open to grasp
            else:
                v_goal = random_direction(rng) * rng.uniform(*SPEED)
                yaw_goal = rng.uniform(-YAW_RATE, YAW_RATE) * (rng.random() < 0.7)
            tilt_goal = np.clip(rng.normal(0, 0.15, 2), -0.3, 0.3)
        segment_left -= 1
        if dive is not None:  # head for the cube at grasp height and turn the fingers square to its faces
            o, speed = objects[dive[0]], dive[1]
            target = np.array([o["centre"][0], o["centre"][1], max(o["half"][2], WORK_LO[2])])
            v_goal = (target - p) * min(1.0, speed / max(np.linalg.norm(target - p), 1e-9))
            grip_yaw = yaw_of(o["R"]) + np.pi / 2 * np.round(wrap(rpy[2] - yaw_of(o["R"])) / (np.pi / 2))
            grip_yaw = np.clip(grip_yaw, -YAW_LIMIT, YAW_LIMIT)
            yaw_goal = float(np.clip(wrap(grip_yaw - rpy[2]), -YAW_RATE, YAW_RATE))
        for a in range(3):  # soft walls: a goal that would leave the workspace within 3 frames turns around
            ahead = p[a] + 3 * v[a]
            if (ahead < WORK_LO[a] and v_goal[a] < 0) or (ahead > WORK_HI[a] and v_goal[a] > 0):
                v_goal[a] = -v_goal[a]
        v += EASE * (v_goal - v)
        p = p + v
        for a in range(3):  # rarely needed: the wall stops it
            if not WORK_LO[a] <= p[a] <= WORK_HI[a]:
                p[a], v[a] = np.clip(p[a], WORK_LO[a], WORK_HI[a]), 0.0
        if abs(rpy[2] + 3 * yaw_rate) > YAW_LIMIT and yaw_goal * rpy[2] > 0:  # a soft wall for the wrist too
            yaw_goal = -yaw_goal
        yaw_rate += EASE * (yaw_goal - yaw_rate)
        rpy[2] = wrap(rpy[2] + yaw_rate)
        rpy[:2] += 0.3 * (tilt_goal - rpy[:2])
        dwell += 1
        if dive is not None and np.linalg.norm(target - p) < 0.012:
            command, dwell, segment_left, dive = 1, 0, 0, None  # there: close on it
        elif dwell >= 4 and rng.random() < TOGGLE:
            command, dwell = 1 - command, 0
        world.step(p, rpy, command)
        states.append(world.state)
        grippers.append(world.g)
        scenes.append(world.scene)
    return np.array(states), np.array(grippers), scenes, world.texts or ["move the gripper around"]




def synth_episode(job):
    """Simulate, render and write one episode (a worker's unit of work). Deterministic in (seed, index)."""
    out, index, name, split, cameras, frames, size, seed, objects, fps = job
    rng = np.random.default_rng([seed, index])
    state, gripper, scenes, texts = simulate_episode(rng, frames, int(rng.integers(objects[0], objects[1] + 1)))
    for k in range(cameras):
        frames_T_H_W_3 = np.stack([render(camera(k, size), *s) for s in scenes])
        # veryfast: 4x quicker than medium here; one thread: a threaded x264 gave files that differed under load
        write_mp4(Path(out) / "videos" / f"cam{k}" / f"{name}.mp4", frames_T_H_W_3, fps=fps, preset="veryfast",
                  threads=1)
    action = relative_actions(state, gripper)
    action[:, 6] = state[1:, 6]  # stored like Bridge: unscaled, column 6 = the binary open command of the target frame
    ann = dict(episode_id=name, task="robot_trajectory_prediction", texts=texts, state=state.tolist(),
               continuous_gripper_state=gripper.tolist(), action=action.tolist())
    path = Path(out) / "annotations" / split / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ann))
    os.replace(tmp, path)  # written last, so an interrupted run leaves no annotation without its videos
    return name


def default_val_episodes(episodes):
    """10 (as before) from 40 episodes up, a quarter below (at least 1 from 2 episodes), so any --episodes works."""
    return 0 if episodes < 2 else min(10, max(1, episodes // 4))


def make_synthetic(out, episodes=100, cameras=4, frames=40, size=(128, 160), seed=0, val_episodes=None,
                   objects=(1, 3), fps=4, workers=None):
    """The synthetic world in the camera-folder layout; the last `val_episodes` (None: default_val_episodes) are
    the val split. Episode i depends only on (seed, i). Bad arguments: one ValueError line."""
    val_episodes = default_val_episodes(episodes) if val_episodes is None else val_episodes
    size = tuple(size)
    problems = [f"episodes must be >= 1, got {episodes}" if episodes < 1 else None,
                f"val_episodes must be in 0..{episodes - 1} (fewer than episodes), got {val_episodes}"
                if not 0 <= val_episodes < max(episodes, 1) else None,
                f"cameras must be >= 1, got {cameras}" if cameras < 1 else None,
                f"frames must be >= 2, got {frames}" if frames < 2 else None,
                f"size must be H x W, both even and >= 8, got {size}"
                if len(size) != 2 or min(size) < 8 or size[0] % 2 or size[1] % 2 else None,
                f"objects must be (min, max) with 0 <= min <= max <= {len(OBJECT_COLOURS)}, got {objects}"
                if not 0 <= objects[0] <= objects[1] <= len(OBJECT_COLOURS) else None]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems))
    jobs = [(str(out), i, f"ep{i:05d}", "val" if i >= episodes - val_episodes else "train", cameras, frames, size,
             seed, tuple(objects), fps) for i in range(episodes)]
    workers = min(workers or os.cpu_count() or 1, episodes)
    desc = f"synth {episodes} episodes x {cameras} cameras"
    if workers > 1:
        # fork: the workers need no torch, and spawning would re-import it in each (seconds)
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        # the workers take SIGTERM's default action: a handler inherited from the caller (train.StopSignal in the
        # same process) would swallow the SIGTERM that Pool's exit sends, and the exit would wait forever
        with ctx.Pool(workers, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
            names = list(progress(pool.imap(synth_episode, jobs, chunksize=max(1, len(jobs) // (8 * workers))),
                                  len(jobs), desc))
    else:
        names = list(progress(map(synth_episode, jobs), len(jobs), desc))
    meta = dict(generator="nanocosmos synth.py", episodes=episodes, val_episodes=val_episodes, cameras=cameras,
                frames=frames, size=list(size), seed=seed, objects=list(objects), fps=fps,
                camera_names=[["front", "left", "right", "top"][k] if k < 4 else f"oblique{k - 4}"
                              for k in range(cameras)])
    (Path(out) / "synth.json").write_text(json.dumps(meta, indent=1))
    return names


def ensure(c, rank=0, say=print, barrier=None):
    """Generate the synthetic world at c["data_root"] when it is the default synthetic root and missing
    (synth_if_missing); any other root is left alone (data.make_dataset names a missing one)."""
    root = c["data_root"]
    if os.path.exists(root) or not c.get("synth_if_missing") or \
            os.path.normpath(root) != os.path.normpath(c.get("synth_data_root", "")):
        return
    if rank == 0:
        say(f"{root} not found: generating the synthetic world ({c['synth_episodes']} episodes, "
            f"{max(c['cameras']) + 1} cameras)")
        make_synthetic(root, episodes=c["synth_episodes"], cameras=max(c["cameras"]) + 1,
                       size=tuple(c["frame_size"]), seed=c["seed"])
    if barrier:
        barrier()


def _size(text):
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 128x160, got {text!r}") from None


def main(argv):
    p = argparse.ArgumentParser(prog="synth.py", description="write the synthetic multi-camera robot world "
                                "(data.py's camera-folder layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=100, help="in all, val included")
    p.add_argument("--val-episodes", type=int, default=None, help="the last ones go to annotations/val "
                   "(default: 10, or a quarter of fewer than 40 episodes)")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=_size, default=(128, 160), help="HxW")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        make_synthetic(args.out, args.episodes, args.cameras, args.frames, args.size, args.seed, args.val_episodes,
                       fps=args.fps, workers=args.workers)
    except ValueError as e:
        p.error(str(e))  # one line and exit code 2, like every other argument error
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.episodes} episodes x {args.cameras} cameras x {args.frames} frames at "
          f"{args.size[0]}x{args.size[1]} to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
