"""
Image-caption data: the built-in `shapes` set (rendered on the fly, for offline runs and tests), real pictures
installable offline (Tux Paint's stamps and Fashion-MNIST), WebDataset tar shards as img2dataset writes them, a
plain folder with captions.jsonl / .tsv, and a downloader for Conceptual Captions shards. Every source yields
(pixels, caption, key); a sample that cannot be read becomes None and is counted by the collate function, so one
bad file never stops a run.
"""
import glob
import io
import json
import os
import random
import re
import sys
import tarfile
import zlib

import numpy as np
import torch
from huggingface_hub import HfApi, constants
from PIL import Image, ImageDraw, ImageOps

from load_weights import hub_download, split_revision

# -----------------------------------------------------------------------------------------------------------
# preprocessing, as google/vit-base-patch16-224's image processor: RGB, resize (bilinear), mean = std = 0.5


def to_rgb(img):
    img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before RGB
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / (256.0 if img.mode != "I" else 65536.0))
                              .clip(0, 255).astype(np.uint8))
    if img.mode == "P" or img.mode == "RGBA" or img.mode == "LA":
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent areas become white, not black
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def to_pixels(img, image_size):
    img = to_rgb(img).resize((image_size, image_size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


def decode_sample(image_bytes, caption_bytes, image_size):
    """(pixels, caption) or None when either part is unusable."""
    try:
        caption = caption_bytes.decode("utf-8").strip() if isinstance(caption_bytes, bytes) else caption_bytes
        if not caption:
            return None
        img = Image.open(io.BytesIO(image_bytes))
        img.load()
        if min(img.size) < 2:
            return None
        return to_pixels(img, image_size), caption
    except Exception:  # truncated, not an image, bad encoding...: skip it, the collate counts it
        return None

# -----------------------------------------------------------------------------------------------------------
# built-in shapes data


COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225), "yellow": (240, 215, 30),
           "purple": (140, 55, 190), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.2, "large": 0.34}  # side as a fraction of the image
BACKGROUNDS = [(235, 235, 235), (200, 200, 200), (120, 120, 120), (60, 60, 60), (235, 225, 200), (200, 220, 235)]
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MIDDLE = 0.15  # half the side of the box whose objects are "in the middle"


# A caption says where things are: a region, a relation, a left-to-right order. An object a hair from the middle
# box's edge or from a diagonal, or two objects a hair apart in x, have no right word: whichever the caption says,
# a person could not tell it from the other, so it would be label noise in training and a coin toss in evaluation.
# Scenes keep every such deciding quantity at least this far (fractions of the image, ~2 px at 64) from its tie,
# as CLEVR's generator keeps its objects a margin apart along each direction.
TIE_MARGIN = 0.03


def shape_scene(seed, index):
    """The content of one image: a background and 1-3 non-overlapping objects (size, colour, shape, x, y), placed
    again until no region, relation or order is within TIE_MARGIN of a tie."""
    rng = random.Random(f"shapes:{seed}:{index}")
    n = rng.choice((1, 2, 3))
    objects = []
    while len(objects) < n or tie_margin(objects) < TIE_MARGIN:
        if len(objects) == n:
            objects = []
        size = rng.choice(list(SIZES))
        r = SIZES[size] / 2
        x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        if all(max(abs(x - o[3]), abs(y - o[4])) > r + SIZES[o[0]] / 2 + 0.03 for o in objects):
            objects.append((size, rng.choice(list(COLOURS)), rng.choice(SHAPES), x, y))
    return {"background": rng.choice(BACKGROUNDS), "objects": objects, "rng": rng}


def tie_margin(objects):
    """How far the quantity that decides what a caption says about where things are is from a tie: for one
    object the edge of the middle box and (outside it) the diagonals, for two the axis they are further apart
    along, for three the gaps between their x."""
    if len(objects) == 1:
        dx, dy = abs(objects[0][3] - 0.5), abs(objects[0][4] - 0.5)
        edge = abs(max(dx, dy) - MIDDLE)
        return edge if max(dx, dy) < MIDDLE else min(edge, abs(dx - dy))
    if len(objects) == 2:
        a, b = objects
        return abs(abs(a[3] - b[3]) - abs(a[4] - b[4]))
    xs = sorted(o[3] for o in objects)
    return min(b - a for a, b in zip(xs, xs[1:]))


def relation(a, b):
    """Where a is relative to b, along the axis where they are further apart (image y grows downwards)."""
    dx, dy = a[3] - b[3], a[4] - b[4]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def region(o):
    dx, dy = o[3] - 0.5, o[4] - 0.5
    if max(abs(dx), abs(dy)) < MIDDLE:
        return "in the middle"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def object_name(o):
    return f"{o[0]} {o[1]} {o[2]}"


def canonical(scene):
    """What a caption of this scene must say; captions of scenes with the same canonical content are equivalent."""
    objs = scene["objects"]
    names = [object_name(o) for o in objs]
    if len(objs) == 1:
        return f"1|{names[0]}|{region(objs[0])}"
    if len(objs) == 2:
        a, b = sorted(range(2), key=lambda i: names[i])
        return f"2|{names[a]}|{relation(objs[a], objs[b])}|{names[b]}"
    return "3|" + "|".join(names[i] for i in reading_order(objs))


def mirror_caption(seed, index):
    """The caption of this scene mirrored left-right (or, where that changes nothing a caption says, top-bottom),
    in the scene's own words: false only in where things are (a region, relation or left-to-right order).
    -> (caption, key), or None where no mirror changes the caption (one object in the middle) or two objects look
    alike (their relation reads both ways). Stage 1 scores it against the scene's own caption (mirror_acc)."""
    scene = shape_scene(seed, index)
    objs, key, state = scene["objects"], canonical(scene), scene["rng"].getstate()
    if len({object_name(o) for o in objs}) < len(objs):
        return None
    for axis in (3, 4):
        m = dict(scene, objects=[o[:axis] + (1 - o[axis],) + o[axis + 1:] for o in objs], rng=random.Random())
        if canonical(m) != key:
            m["rng"].setstate(state)  # the same draws as the scene's own caption: the same wording
            return shape_caption(m), canonical(m)
    return None


def object_count(key):
    """How many objects a shapes key (canonical()) names; None for any other key (a real caption)."""
    head, bar, _ = key.partition("|")
    return int(head) if bar and head in ("1", "2", "3") else None


SLOT_WORDS = (*SIZES, *COLOURS, *SHAPES, "left", "right", "top", "bottom", "middle", "above")


def slot_words(key):
    """What a shapes caption says, one word per slot in reading order (the caption's own order): each object's
    size, colour and shape, and the region word (one object) or relation word (two objects, between them).
    None for any other key (a real caption)."""
    n, parts = object_count(key), key.split("|")[1:]
    if n == 1:
        return parts[0].split() + parts[1].split()[-1:]  # "on the left" -> left
    if n == 2:
        a, rel, b = parts  # canonical(): a is the object whose name sorts first
        if rel in ("right of", "below"):
            a, b, rel = b, a, {"right of": "left of", "below": "above"}[rel]
        return a.split() + rel.split()[:1] + b.split()
    return " ".join(parts).split() if n == 3 else None


def reading_order(objs):
    """The objects' indices in the order a caption names them: two in reading order (the one on the left, or on
    top, first), three from left to right. So one picture has one right caption up to its wording, not two
    mirror-image sentences to choose from."""
    if len(objs) == 2:
        return [0, 1] if relation(objs[0], objs[1]) in ("left of", "above") else [1, 0]
    return sorted(range(len(objs)), key=lambda k: objs[k][3])


def slot_objects(scene):
    """Which object each of slot_words' words describes (an index into scene["objects"]), None for a region or
    relation word."""
    order = reading_order(scene["objects"])
    if len(order) == 1:
        return [0, 0, 0, None]
    if len(order) == 2:
        return [order[0]] * 3 + [None] + [order[1]] * 3
    return [k for k in order for _ in range(3)]


def shape_caption(scene):
    rng, objs = scene["rng"], scene["objects"]
    name = [object_name(o) for o in objs]
    if len(objs) == 1:
        where = region(objs[0])
        return rng.choice([f"a {name[0]} {where}", f"one {name[0]} {where}", f"there is one {name[0]} {where}",
                           f"a single {name[0]} {where}"])
    if len(objs) == 2:
        i, j = reading_order(objs)
        rel = {"left of": "to the left of", "above": "above"}[relation(objs[i], objs[j])]
        return rng.choice([f"a {name[i]} {rel} a {name[j]}", f"two shapes: a {name[i]} {rel} a {name[j]}",
                           f"there are two shapes, a {name[i]} {rel} a {name[j]}"])
    order = reading_order(objs)
    listed = f"a {name[order[0]]}, a {name[order[1]]} and a {name[order[2]]}"
    # every wording says "from left to right" before the list: with it after the list, a greedy decoder that
    # blends two wordings ("three shapes: a ..., a ... and a ...") could end without it (EXPERIMENTS.md)
    return rng.choice([f"three shapes, from left to right: {listed}", f"from left to right, three shapes: {listed}",
                       f"there are three shapes, from left to right: {listed}"])


def draw_object(draw, obj, s, fill):
    """Draw one object (size, colour, shape, x, y) on a PIL canvas of side s."""
    size, _, shape, x, y = obj
    r = SIZES[size] * s / 2
    cx, cy = x * s, y * s
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)


def render_scene(scene, image_size):
    s = 4 * image_size  # draw large, then downsample: anti-aliased edges at any size
    rng = scene["rng"]
    bg = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in scene["background"])
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        draw_object(draw, obj, s, COLOURS[obj[1]])
    return img.resize((image_size, image_size), Image.LANCZOS)


def object_coverage(scene, grid, sub=8):
    """[grid, grid, 1 + n_objects]: the share of each grid cell covered by the background (0) and by each
    object (k = objects[k-1]), from the same drawing as render_scene. Objects never overlap."""
    s = grid * sub
    ids = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(ids)
    for k, obj in enumerate(scene["objects"], 1):
        draw_object(draw, obj, s, k)
    a = np.asarray(ids).reshape(grid, sub, grid, sub).transpose(0, 2, 1, 3).reshape(grid, grid, sub * sub)
    return np.stack([(a == k).mean(-1) for k in range(1 + len(scene["objects"]))], -1)


def make_shape_example(seed: int, index: int, image_size: int):
    """(PIL image, caption) for shapes example `index` of split `seed`; the same arguments give the same pair."""
    scene = shape_scene(seed, index)
    caption = shape_caption(scene)  # the caption draws from scene["rng"] before rendering does: keep this order
    return render_scene(scene, image_size), caption


SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # disjoint images per split


class ShapesDataset(torch.utils.data.Dataset):
    def __init__(self, split="train", length=10**9, image_size=64):
        self.seed, self.length, self.image_size = SPLIT_SEEDS[split], length, image_size

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        img, caption = make_shape_example(self.seed, index, self.image_size)
        return to_pixels(img, self.image_size), caption, canonical(shape_scene(self.seed, index)), index

    def caption_and_key(self, index):  # without rendering: what the feature cache needs
        scene = shape_scene(self.seed, index)
        return shape_caption(scene), canonical(scene)  # canonical reads the objects only, not the rng

    def mirror_caption(self, index):
        return mirror_caption(self.seed, index)

    def slot_cover(self, index, n_slots, grid):
        """[n_slots, grid * grid]: the share of each patch (row-major, as a ViT orders them) that the object
        slot k's word describes covers; zeros for a region or relation word and past the last word."""
        scene = shape_scene(self.seed, index)
        cover = object_coverage(scene, grid)
        out = np.zeros((n_slots, grid * grid), np.float32)
        for k, o in enumerate(slot_objects(scene)):
            if o is not None:
                out[k] = cover[..., 1 + o].reshape(-1)
        return out

# -----------------------------------------------------------------------------------------------------------
# real data: WebDataset shards (streamed) and a folder of images with a captions file


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_shards(spec):
    """'a.tar,b.tar', 'dir/*.tar', or a list -> sorted list of existing shard paths."""
    parts = spec if isinstance(spec, (list, tuple)) else spec.split(",")
    paths = []
    for p in parts:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        paths += [h for h in hits if os.path.isfile(h)]
        if not hits or not all(os.path.isfile(h) for h in hits):
            raise FileNotFoundError(f"no shard matches '{p}'")
    return paths


def iter_tar(path):
    """Group a tar's members by key (the name up to the first dot of its basename): {ext: bytes} per sample."""
    current, parts = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:  # streaming mode: no extraction, no seeking
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                key, _, ext = base.partition(".")
                key = f"{d}/{key}" if d else key
                if key != current and current is not None:
                    yield current, parts
                    parts = {}
                current = key
                parts[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        print(f"warning: {path} ends early ({e}); samples after that point are skipped", file=sys.stderr)
    if current is not None:
        yield current, parts


class WebDataset(torch.utils.data.IterableDataset):
    """Streams (pixels, caption, key) from img2dataset shards, split across DataLoader workers and DDP ranks."""

    def __init__(self, shards, image_size=224, rank=0, world_size=1, max_samples=None, skip=0):
        self.shards, self.image_size = expand_shards(shards), image_size
        self.rank, self.world_size, self.max_samples, self.skip = rank, world_size, max_samples, skip
        self.resume_skip = 0  # set by the training loop: samples already consumed before a resume

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + wid, self.world_size * nw
        n = 0
        for path in self.shards:
            for key, parts in iter_tar(path):
                n += 1
                if self.max_samples and n > self.max_samples:
                    return
                if n <= self.skip + self.resume_skip or (n - 1) % slots != slot:  # every sample goes to exactly one worker
                    continue
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if img is None or "txt" not in parts:
                    yield None
                    continue
                s = decode_sample(img, parts["txt"], self.image_size)
                yield None if s is None else (*s, s[1], n - 1)


class FolderDataset(torch.utils.data.Dataset):
    """A folder with captions.jsonl ({"image": path, "caption": text} per line) or captions.tsv (path<TAB>text)."""

    def __init__(self, root, image_size=224):
        self.root, self.image_size, self.items = root, image_size, []
        jl, tsv = os.path.join(root, "captions.jsonl"), os.path.join(root, "captions.tsv")
        if os.path.exists(jl):
            for line in open(jl, encoding="utf-8", errors="replace"):
                if line.strip():
                    d = json.loads(line)
                    self.items.append((d.get("image") or d.get("file_name"), d.get("caption") or d.get("text", "")))
        elif os.path.exists(tsv):
            for line in open(tsv, encoding="utf-8", errors="replace"):
                if "\t" in line:
                    self.items.append(tuple(line.rstrip("\n").split("\t", 1)))
        else:
            raise FileNotFoundError(f"{root} has neither captions.jsonl nor captions.tsv")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption = self.items[i]
        try:
            with open(os.path.join(self.root, path), "rb") as f:
                s = decode_sample(f.read(), caption, self.image_size)
        except OSError:
            return None
        return None if s is None else (*s, s[1], i)

    def caption_and_key(self, i):
        return self.items[i][1], self.items[i][1]

# -----------------------------------------------------------------------------------------------------------
# real pictures, offline: Tux Paint's stamps (drawings and photo cut-outs, each with an English caption) and
# Fashion-MNIST's product photos, both installable from Debian (`tuxpaint-stamps-default`,
# `dataset-fashion-mnist`). Held out by image: a fixed 15% of the stamps, and Fashion-MNIST's t10k set.


STAMPS_DIR = "/usr/share/tuxpaint/stamps"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("a T-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                   "a sneaker", "a bag", "an ankle boot")  # in label order
FASHION_PHRASES = ("A photo of {}.", "{}.", "A black and white photo of {}.", "A small grey picture of {}.")
# what counts as naming each class in a generated caption (a regex per class, on the lower-cased caption)
FASHION_WORDS = (r"t-?shirts?|tee|\btops?\b", r"trousers?|pants|jeans", r"pullovers?|sweaters?|jumpers?",
                 r"dress(es)?", r"coats?|jackets?", r"sandals?", r"(?<!t-)(?<!t )\bshirts?\b", r"sneakers?|trainers?",
                 r"bags?|handbags?|purses?", r"boots?")


def read_idx(path):
    """An idx file (MNIST's format, gzipped): uint8 array with the shape its header gives."""
    import gzip
    raw = gzip.open(path).read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def words(text):
    return re.findall(r"[a-z][a-z\-]*", text.lower())


def list_stamps(root=STAMPS_DIR):
    """[(png path, caption)] for every stamp with a caption file (its first line is English)."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True)):
        txt = path[:-4] + ".txt"
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8", errors="replace") as f:
                caption = f.readline().strip()
            if caption:
                out.append((path, caption))
    return out


def head_noun(caption):
    """'A US 1 cent piece ($.01) called a penny.' -> 'piece'; 'A pair of pliers.' -> 'pliers'."""
    text = re.sub(r"^(a|an|the)\s+(pair of\s+)?", "", caption.lower())
    text = re.split(r"\s(?:called|with|for|in|of|on|that|from|and|at|who|which|playing|holding|wearing|eating|"
                    r"sitting|standing)\s|[,(:;—.!?]", text)[0]
    found = words(text)
    return found[-1] if found else ""


def names(caption):
    """The words that name a stamp's object: its head noun, and the name after 'called' where there is one."""
    out = {head_noun(caption)} - {""}
    m = re.search(r"called (?:an? |the )?([a-z\-]+)", caption.lower())
    if m:
        out.add(m[1])
    return out


def mentions(text, word):
    return re.search(rf"\b{re.escape(word)}(e?s)?\b", text.lower()) is not None


class RealPictures(torch.utils.data.Dataset):
    """Stamps and Fashion-MNIST as one map-style dataset. Train: the training stamps up to three times (as drawn,
    mirrored, zoomed in: they are few) in at most half of `length`, then Fashion-MNIST train images. Val: the
    held-out stamps first, then Fashion-MNIST t10k images up to `length`."""

    def __init__(self, split="train", length=4000, image_size=112, stamps_dir=None, fashion_dir=None):
        stamps_dir, fashion_dir = stamps_dir or STAMPS_DIR, fashion_dir or FASHION_DIR
        if not os.path.isdir(stamps_dir) or not os.path.isdir(fashion_dir):
            raise FileNotFoundError(f"the real-pictures data is missing ({stamps_dir}, {fashion_dir}): "
                                    "sudo apt install tuxpaint-stamps-default dataset-fashion-mnist")
        self.image_size, self.train = image_size, split == "train"
        stamps = list_stamps(stamps_dir)
        held = lambda p: zlib.crc32(os.path.relpath(p, stamps_dir).encode()) % 100 < 15
        train_stamps = [s for s in stamps if not held(s[0])]
        # nouns the training captions contain: held-out stamps are scored separately for seen and unseen ones
        self.seen = {w for c in [c for _, c in train_stamps] + list(FASHION_CLASSES) for w in words(c)}
        if self.train:  # at most half the set: as drawn, then mirrored, then zoomed, as far as room allows
            self.stamps = [(p, c, r) for r in range(3) for p, c in train_stamps][:length // 2]
        else:
            self.stamps = [(p, c, 0) for p, c in stamps if held(p)]
        prefix = "train" if self.train else "t10k"
        n_fashion = max(0, length - len(self.stamps))  # slicing stops at the file's own size
        self.fashion = read_idx(os.path.join(fashion_dir, f"{prefix}-images-idx3-ubyte.gz"))[:n_fashion]
        self.labels = read_idx(os.path.join(fashion_dir, f"{prefix}-labels-idx1-ubyte.gz"))[:n_fashion]

    def __len__(self):
        return len(self.stamps) + len(self.fashion)

    def caption_and_key(self, i):
        if i < len(self.stamps):
            caption = self.stamps[i][1]
            return caption, caption
        label = int(self.labels[i - len(self.stamps)])
        phrase = FASHION_PHRASES[zlib.crc32(f"{self.train}{i}".encode()) % len(FASHION_PHRASES)]
        caption = phrase.format(FASHION_CLASSES[label])
        return caption[0].upper() + caption[1:], FASHION_CLASSES[label]  # one key per class: ITC positives

    def image(self, i):
        if i >= len(self.stamps):
            return Image.fromarray(self.fashion[i - len(self.stamps)])
        path, _, r = self.stamps[i]
        img = Image.open(path)
        img.load()
        if r == 1:
            img = ImageOps.mirror(img)
        elif r == 2:  # the middle 80%
            w, h = img.size
            img = img.crop((w // 10, h // 10, w - w // 10, h - h // 10))
        return img

    def __getitem__(self, i):
        caption, key = self.caption_and_key(i)
        try:
            return to_pixels(self.image(i), self.image_size), caption, key, i
        except OSError:  # a broken file: skipped and counted, as for any source
            return None

    def score_captions(self, captions, index):
        """How often a generated caption names the object: the Fashion-MNIST class, and the held-out stamps'
        object (its head noun or the name after 'called'), those whose noun occurs in the training captions apart
        from those whose noun does not."""
        hits = {"fashion": [], "stamps_seen": [], "stamps_unseen": []}
        for text, i in zip(captions, index):
            if i >= len(self.stamps):
                label = int(self.labels[i - len(self.stamps)])
                hits["fashion"].append(re.search(FASHION_WORDS[label], text.lower()) is not None)
            else:
                nouns = names(self.stamps[i][1])
                group = "stamps_seen" if nouns & self.seen else "stamps_unseen"
                hits[group].append(any(mentions(text, w) for w in nouns))
        out = {}
        for k, v in hits.items():
            out[f"named_{k}"], out[f"n_{k}"] = (sum(v) / len(v) if v else 0.0), len(v)
        return out


def photo_paths():
    """A few real photos that ship with scikit-image and scikit-learn, where those are installed."""
    import importlib.util
    out = []
    for package, folder, files in (("skimage", "data", ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")),
                                   ("sklearn", "datasets/images", ("china.jpg", "flower.jpg"))):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            out += [p for f in files if os.path.isfile(p := os.path.join(os.path.dirname(spec.origin), folder, f))]
    return out

# -----------------------------------------------------------------------------------------------------------
# batching


class StepSampler(torch.utils.data.Sampler):
    """Indices of micro-batch `start`, `start`+1, ... forever: one seeded permutation per epoch, each global
    batch split across DDP ranks. Resuming at a step is exact and costs nothing (no samples are read).
    lengths (one per index; optional): within each window of `group` global batches of the permutation, samples
    of similar length are batched together and the window's batches are then shuffled, so that a batch pads
    little (right padding is computed like any other token: a fifth of stage 2's tokens were padding)."""

    def __init__(self, n, batch_size, seed=0, rank=0, world=1, start=0, lengths=None, group=16):
        self.n, self.b, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.lengths, self.group = lengths, group
        assert n >= batch_size * world, f"dataset of {n} is smaller than one global batch ({batch_size * world})"
        assert lengths is None or len(lengths) == n

    def epoch_order(self, epoch):
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm
        gb, lengths = self.b * self.world, torch.as_tensor(self.lengths)
        out = []
        for window in perm[:self.n - self.n % gb].split(gb * self.group):  # whole global batches only
            batches = window[lengths[window].sort(stable=True).indices].view(-1, gb)
            out.append(batches[torch.randperm(len(batches), generator=g)].flatten())
        return torch.cat(out)

    def __iter__(self):
        per_epoch, m, epoch, order = self.n // (self.b * self.world), self.start, None, None
        while True:
            e, k = divmod(m, per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            lo = (k * self.world + self.rank) * self.b
            yield from order[lo:lo + self.b].tolist()
            m += 1


class FeatureCache(torch.utils.data.Dataset):
    """Wraps a map-style dataset: once a frozen encoder's output for index i is stored (float16 memmap on disk:
    the ViT's tokens in stage 1, the frozen Q-Former's queries in stage 2), item i is served from it instead of
    decoding and encoding the image again."""

    def __init__(self, dataset, path, tokens, width, fresh=True):
        self.ds, n = dataset, len(dataset)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        mode = "w+" if fresh or not os.path.exists(path + ".filled") else "r+"  # a new run: nothing is stale
        self.feats = np.lib.format.open_memmap(path + ".npy", mode=mode, dtype=np.float16, shape=(n, tokens, width))
        self.filled = np.lib.format.open_memmap(path + ".filled", mode=mode, dtype=np.uint8, shape=(n,))
        assert self.feats.shape == (n, tokens, width), f"{path}.npy was made for another dataset or ViT"

    def __len__(self):
        return len(self.ds)

    def caption_and_key(self, i):
        return self.ds.caption_and_key(i)

    def __getitem__(self, i):
        if self.filled[i]:
            caption, key = self.ds.caption_and_key(i)
            return torch.from_numpy(np.array(self.feats[i])), caption, key, i
        return self.ds[i]

    def put(self, index, feats):
        f = feats.detach().to("cpu", torch.float16).numpy()
        for j, i in enumerate(index.tolist()):
            self.feats[i] = f[j]
            self.filled[i] = 1


class Collate:
    """Stacks images, tokenizes captions (BERT tokenizer: [CLS] ... [SEP], padded), drops and counts bad samples."""

    def __init__(self, tokenizer, max_len=32, pad_id=0, slots=0, cover=None):
        self.tok, self.max_len, self.pad_id = tokenizer, max_len, pad_id
        self.slots = slots  # >0: slot_ids [B, slots], the slot words' token ids, [PAD] after the last
        self.cover = cover  # index -> [slots, patches] (ShapesDataset.slot_cover): batch["slot_cover"]
        if slots:  # each slot word's token ids, and the ids a slot can hold: [PAD] and every slot word's
            self.word_ids = {w: tokenizer.encode(w, add_special_tokens=False).ids for w in SLOT_WORDS}
            self.slot_vocab = torch.tensor(sorted({pad_id} | {i for ids in self.word_ids.values() for i in ids}))

    def tokenize(self, captions):
        enc = [e.ids[:self.max_len - 1] + e.ids[-1:] if len(e.ids) > self.max_len else e.ids
               for e in self.tok.encode_batch(captions)]
        T = max(len(e) for e in enc)
        return (torch.tensor([e + [self.pad_id] * (T - len(e)) for e in enc]),
                torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc]))

    def __call__(self, samples):
        good = [s for s in samples if s is not None]
        batch = {"skipped": len(samples) - len(good)}
        if not good:
            return batch
        if all(s[0].dim() == 3 for s in good):
            batch["pixel_values"] = torch.stack([s[0] for s in good])
        else:  # some (or all) came from the feature cache: [tokens, width] instead of [3, H, W]
            batch["images"] = [s[0] for s in good]
        batch["captions"] = [s[1] for s in good]
        batch["keys"] = [s[2] for s in good]
        batch["key_ids"] = torch.tensor([zlib.crc32(k.encode()) for k in batch["keys"]], dtype=torch.long)
        batch["index"] = torch.tensor([s[3] for s in good])
        if self.tok is not None:
            batch["input_ids"], batch["attention_mask"] = self.tokenize(batch["captions"])
        if self.slots:
            ids = [[i for w in slot_words(k) for i in self.word_ids[w]] for k in batch["keys"]]
            if max(map(len, ids)) > self.slots:
                raise ValueError(f"a scene has {max(map(len, ids))} slot words, more than the {self.slots} queries")
            batch["slot_ids"] = torch.tensor([(x + [self.pad_id] * self.slots)[:self.slots] for x in ids])
        if self.cover is not None:
            batch["slot_cover"] = torch.stack([torch.from_numpy(self.cover(int(i))) for i in batch["index"]])
        return batch

# -----------------------------------------------------------------------------------------------------------
# Conceptual Captions (and any WebDataset repo on the hub), downloaded shard by shard into the hub cache


HUB_DATASETS = {"cc3m": "pixparse/cc3m-wds", "cc12m": "pixparse/cc12m-wds"}


def pick_shards(listing, split="train"):
    """From a hub tree listing (paths), the split's .tar shards in order."""
    return sorted(p for p in listing if p.endswith(".tar") and split in os.path.basename(p))


def hub_shards(repo, split="train", n_pairs=0):
    """Local paths of the first shards of `split` in a WebDataset dataset repo that hold n_pairs samples (0: all
    of them), downloaded into the hub cache on first use: a stopped download starts again from the shards it
    finished, and with DDP one process per machine downloads each shard while the others wait for it. Shards and
    their sizes come from the repo's _info.json where it has one, else from the full listing. 'org/name@revision'
    pins a revision. [] when the repo has no such split. Asked afresh each run (offline: from the cache), so a larger n_pairs fetches more."""
    repo, revision = split_revision(repo)
    info = hub_download(repo, "_info.json", revision, "dataset")
    if info is not None:
        spec = json.load(open(info)).get("splits", {}).get(split)
        if spec is None:
            return []
        names, sizes = spec["filenames"], spec.get("shard_lengths") or [None] * len(spec["filenames"])
    else:
        if constants.HF_HUB_OFFLINE:
            raise ConnectionError(f"dataset '{repo}' has no _info.json to list its shards offline; pass the cached "
                                  "shards with --data 'path/*.tar'")
        names = pick_shards([e.path for e in HfApi().list_repo_tree(repo, recursive=True, repo_type="dataset",
                                                                     revision=revision)], split)
        sizes = [None] * len(names)
    paths, total = [], 0
    for name, size in zip(names, sizes):
        if n_pairs and total >= n_pairs:
            break
        path = hub_download(repo, name, revision, "dataset")
        if path is None:
            raise FileNotFoundError(f"dataset '{repo}' lists {name} but does not have it")
        paths.append(path)
        total += size if size is not None else sum(1 for _, parts in iter_tar(path) if "txt" in parts)
        print(f"{repo} {split}: {total:,}{f'/{n_pairs:,}' if n_pairs else ''} pairs in {len(paths)} shards",
              file=sys.stderr, flush=True)
    if n_pairs and total < n_pairs:
        print(f"warning: {repo} has only {total:,} {split} pairs, fewer than the {n_pairs:,} asked for",
              file=sys.stderr, flush=True)
    return paths


def reference_captions(seed, index, k=5):
    """The training caption of a shapes image plus k-1 other phrasings of the same scene (for BLEU / CIDEr)."""
    scene = shape_scene(seed, index)
    refs = [shape_caption(scene)]
    for j in range(1, k):
        scene["rng"] = random.Random(f"ref:{seed}:{index}:{j}")
        refs.append(shape_caption(scene))
    return refs
