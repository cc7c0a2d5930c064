"""Offline synthetic twins of the recipe's four tasks: seeded, deterministic, rendered lazily.

Each twin mimics its task's *shape* — prompt format, number of images, turns, answer style — and its
*sequence-length profile* (image sizes and text lengths), so benchmarks and tests run without downloads:

* ``docvqa``: rendered document pages (title, fields, table, paragraphs) with one question whose answer is printed on
  the page. Page formats (letter/A4, 150–200 dpi, some landscape) are mixed so the mean sequence length at
  ``num_crops=16`` reproduces the recipe's 2443.23 tokens (see :data:`TWIN_PROFILES`).
* ``nlvr2``: two images of coloured shapes and 2–3 true/false statements (multi-turn).
* ``hateful_memes``: one meme-style image with a caption; the Yes/No label depends on both image and caption.
* ``ucf101``: 8 frames (320×240, UCF-101's size) of a shape moving/growing/shrinking; the label is the motion class.

Records are cheap to create (only text and layout are generated); pixels are drawn when an image is loaded, so
generating 32 records takes milliseconds and rendering all their images well under a few seconds.
"""

from __future__ import annotations

import functools
import math
import random
import textwrap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from phi3v_core.data.records import LazyImage, Record, Turn, image_tags
from phi3v_core.data.twin_profiles import TWIN_PROFILES, TwinProfile, expected_mean_sequence_length

__all__ = [
    "DOCVQA_ANSWER_SUFFIX",
    "SYNTHETIC_TASKS",
    "TWIN_PROFILES",
    "TwinProfile",
    "UCF_PROMPT_PREFIX",
    "expected_mean_sequence_length",
    "synthesize",
    "ucf101_prompt",
]

#: Appended to DocVQA questions by the recipe's mini run.
DOCVQA_ANSWER_SUFFIX = "\nAnswer briefly."
#: UCF-101 prompt prefix, exactly as ``convert_ucf101`` writes it (followed by the class list and a period).
UCF_PROMPT_PREFIX = "Classify the video into one of the following classes: "

_GOLDEN = (math.sqrt(5) - 1) / 2  # low-discrepancy stride: sample means of page formats converge like 1/N


def ucf101_prompt(classes: Sequence[str]) -> str:
    """The recipe's UCF-101 prompt: ``"Classify the video into one of the following classes: A, B, C."``."""
    return UCF_PROMPT_PREFIX + ", ".join(classes) + "."


def _rng(task: str, split: str, seed: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across processes and PYTHONHASHSEED.
    return random.Random(f"phi3v-synthetic/{task}/{split}/{seed}")


def _pick_weighted(u: float, options: Sequence[tuple[object, float]]) -> object:
    total = sum(w for _, w in options)
    acc = 0.0
    for value, weight in options:
        acc += weight / total
        if u < acc:
            return value
    return options[-1][0]


_FONTS = threading.local()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # One cache per thread: a FreeType face must not render from two threads at once (images are written in parallel).
    cache = _FONTS.__dict__.setdefault("by_size", {})
    if size not in cache:
        cache[size] = ImageFont.load_default(size=max(8, size))
    return cache[size]


# --------------------------------------------------------------------------------------------------------------------
# DocVQA-like pages
# --------------------------------------------------------------------------------------------------------------------

_COMPANIES = (
    "Northwind Tobacco Co.", "Contoso Research Labs", "Globex Corporation", "Initech Laboratories",
    "Umbrella Health Inc.", "Blue Ridge Foods", "Fabrikam Chemicals", "Tailspin Packaging", "Litware Institute",
    "Woodgrove Bank", "Adventure Works", "Proseware Ltd.",
)  # fmt: skip
_DOC_TYPES = (
    "INVOICE", "MEMORANDUM", "PURCHASE ORDER", "RESEARCH REPORT", "MEETING MINUTES", "EXPENSE REPORT",
    "SHIPPING NOTICE", "BUDGET SUMMARY",
)  # fmt: skip
_FIRST = ("John", "Mary", "Robert", "Linda", "James", "Susan", "David", "Karen", "Paul", "Nancy", "Mark", "Ruth")
_LAST = ("Smith", "Johnson", "Walker", "Harris", "Clark", "Lewis", "Young", "Allen", "King", "Wright", "Scott", "Green")
_DEPARTMENTS = ("Quality Assurance", "Marketing", "Research and Development", "Finance", "Legal", "Operations")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_ITEMS = ("Filters", "Cartons", "Labels", "Solvent", "Sample kits", "Printer paper", "Tape", "Glassware")
_FILLER = (
    "the committee reviewed the results of the quarterly program and agreed to continue the current approach "
    "while monitoring costs closely further analysis of the samples will be completed before the next meeting "
    "all departments are asked to submit their estimates by the end of the month the proposed changes were "
    "discussed in detail and no objections were raised please contact the office if you have any questions "
    "regarding this matter the attached schedule lists the remaining tasks and the responsible persons"
).split()


@dataclass(frozen=True)
class _TextLine:
    x: int
    y: int
    size: int
    text: str


@dataclass(frozen=True)
class _PageSpec:
    width: int
    height: int
    lines: tuple[_TextLine, ...]
    rules: tuple[tuple[int, int, int, int], ...]  # horizontal/vertical ruling lines (x0, y0, x1, y1)


def _render_page(spec: _PageSpec) -> Image.Image:
    # Grayscale drawing is ~3x faster; the processor needs RGB, so convert once at the end.
    page = Image.new("L", (spec.width, spec.height), 255)
    draw = ImageDraw.Draw(page)
    for line in spec.lines:
        draw.text((line.x, line.y), line.text, fill=20, font=_font(line.size))
    for x0, y0, x1, y1 in spec.rules:
        draw.line((x0, y0, x1, y1), fill=60, width=max(1, spec.width // 850))
    return page.convert("RGB")


def _money(rng: random.Random) -> str:
    return f"${rng.randint(100, 99999):,}.{rng.randint(0, 99):02d}"


def _docvqa_record(rng: random.Random, size: tuple[int, int], index: int, split: str, seed: int) -> Record:
    width, height = size
    scale = width / 1700 if width < height else height / 1700  # type size follows the page's short side (dpi)
    body, header, title_size = round(26 * scale), round(46 * scale), round(38 * scale)
    margin = round(0.08 * width)
    lines: list[_TextLine] = []
    rules: list[tuple[int, int, int, int]] = []
    company = rng.choice(_COMPANIES)
    doc_type = rng.choice(_DOC_TYPES)
    person = lambda: f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"  # noqa: E731 - tiny local helper
    date = f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1962, 2004)}"
    number = str(rng.randint(10000, 99999))
    total = _money(rng)
    phone = f"({rng.randint(201, 989)}) 555-{rng.randint(0, 9999):04d}"
    department = rng.choice(_DEPARTMENTS)
    to_name, from_name = person(), person()
    fields = [
        ("Date", date, "What is the date mentioned in this document?", [date]),
        ("Document No.", number, "What is the document number?", [number]),
        ("To", to_name, "To whom is this document addressed?", [to_name]),
        ("From", from_name, "Who is this document from?", [from_name]),
        ("Department", department, "Which department is mentioned in the document?", [department]),
        ("Phone", phone, "What is the phone number given?", [phone]),
        ("Total", total, "What is the total amount?", [total, total.lstrip("$")]),
    ]
    y = margin
    lines.append(_TextLine(margin, y, header, company))
    y += round(header * 1.6)
    rules.append((margin, y, width - margin, y))
    y += round(body * 1.2)
    lines.append(_TextLine(margin, y, title_size, doc_type))
    y += round(title_size * 2.0)
    for key, value, _, _ in fields:
        lines.append(_TextLine(margin, y, body, f"{key}: {value}"))
        y += round(body * 1.5)
    y += body
    # A small table: item / quantity / amount; quantities become questions too.
    items = rng.sample(_ITEMS, 3)
    quantities = [str(rng.randint(2, 480)) for _ in items]
    col = (width - 2 * margin) // 3
    rules.append((margin, y - body // 3, width - margin, y - body // 3))
    for c, head in enumerate(("Item", "Quantity", "Amount")):
        lines.append(_TextLine(margin + c * col, y, body, head))
    y += round(body * 1.5)
    for item, qty in zip(items, quantities):
        for c, cell in enumerate((item, qty, _money(rng))):
            lines.append(_TextLine(margin + c * col, y, body, cell))
        y += round(body * 1.5)
    rules.append((margin, y, width - margin, y))
    y += body * 2
    chars = max(20, int((width - 2 * margin) / (0.52 * body)))
    while y < height - margin - 6 * body:
        words = [rng.choice(_FILLER) for _ in range(rng.randint(40, 90))]
        paragraph = " ".join(words).capitalize() + "."
        for text in textwrap.wrap(paragraph, chars):
            if y >= height - margin - 4 * body:
                break
            lines.append(_TextLine(margin, y, body, text))
            y += round(body * 1.45)
        y += body
    pages = rng.randint(1, 12)
    lines.append(_TextLine(width // 2 - 3 * body, height - margin, body, f"Page {rng.randint(1, pages)} of {pages}"))

    questions = [(q, answers) for _, _, q, answers in fields]
    questions += [
        ("Which company issued this document?", [company]),
        ("What type of document is this?", [doc_type, doc_type.title()]),
        *[(f"What is the quantity of {item.lower()}?", [qty]) for item, qty in zip(items, quantities)],
    ]
    question, answers = rng.choice(questions)
    spec = _PageSpec(width, height, tuple(lines), tuple(rules))
    image = LazyImage(functools.partial(_render_page, spec), size=(width, height), name=f"docvqa-{split}-{index}")
    user = f"{image_tags(1)}\n{question}{DOCVQA_ANSWER_SUFFIX}"
    return Record(
        id=f"synthetic-docvqa-{split}-{seed}-{index:06d}",
        source="synthetic-docvqa",
        conversations=[Turn(user=user, assistant=answers[0], images=[image], answers=list(answers))],
    )


def synthetic_docvqa(n: int, *, seed: int = 0, split: str = "train") -> list[Record]:
    """DocVQA-like records: one rendered page and one question (with "Answer briefly.") per record."""
    rng = _rng("docvqa", split, seed)
    offset = rng.random()
    return [
        _docvqa_record(rng, _pick_weighted((offset + i * _GOLDEN) % 1.0, TWIN_PROFILES["docvqa"].image_sizes), i, split, seed)  # type: ignore[arg-type]
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------------------------------
# Shapes (NLVR2-, memes- and UCF-like twins)
# --------------------------------------------------------------------------------------------------------------------

_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
_KINDS = ("circle", "square", "triangle")


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    cx: float  # centre and size as fractions of the image width/height, so one scene renders at any size
    cy: float
    r: float


@dataclass(frozen=True)
class _SceneSpec:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[_Shape, ...]
    caption: str = ""


def _draw_shape(draw: ImageDraw.ImageDraw, shape: _Shape, width: int, height: int) -> None:
    cx, cy = shape.cx * width, shape.cy * height
    r = shape.r * min(width, height)
    fill = _COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=(0, 0, 0))
    elif shape.kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=(0, 0, 0))
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=(0, 0, 0))


def _render_scene(spec: _SceneSpec) -> Image.Image:
    image = Image.new("RGB", (spec.width, spec.height), spec.background)
    draw = ImageDraw.Draw(image)
    for shape in spec.shapes:
        _draw_shape(draw, shape, spec.width, spec.height)
    if spec.caption:
        size = max(12, spec.width // 18)
        draw.text(
            (spec.width // 2, size // 2),
            spec.caption,
            font=_font(size),
            fill=(255, 255, 255),
            stroke_width=max(1, size // 12),
            stroke_fill=(0, 0, 0),
            anchor="ma",
        )
    return image


def _background(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(200, 250), rng.randint(200, 250), rng.randint(200, 250))


def _random_shapes(rng: random.Random, count: int) -> tuple[_Shape, ...]:
    cells = rng.sample(range(9), count)  # a 3×3 grid keeps shapes apart, so counts are visually unambiguous
    shapes = []
    for cell in cells:
        row, col = divmod(cell, 3)
        shapes.append(
            _Shape(
                kind=rng.choice(_KINDS),
                colour=rng.choice(list(_COLOURS)),
                cx=(col + 0.5 + rng.uniform(-0.15, 0.15)) / 3,
                cy=(row + 0.5 + rng.uniform(-0.15, 0.15)) / 3,
                r=rng.uniform(0.07, 0.12),
            )
        )
    return tuple(shapes)


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else f"{kind}s"


def _nlvr2_statement(rng: random.Random, left: Sequence[_Shape], right: Sequence[_Shape]) -> tuple[str, bool]:
    sides = {"left": left, "right": right}
    template = rng.randrange(5)
    if template == 0:
        side, colour, kind = rng.choice(list(sides)), rng.choice(list(_COLOURS)), rng.choice(_KINDS)
        actual = sum(1 for s in sides[side] if s.colour == colour and s.kind == kind)
        claimed = actual if rng.random() < 0.5 else rng.choice([c for c in range(0, 4) if c != actual])
        return f"The {side} image contains exactly {claimed} {colour} {_plural(kind, claimed)}.", claimed == actual
    if template == 1:
        kind = rng.choice(_KINDS)
        n_left = sum(1 for s in left if s.kind == kind)
        n_right = sum(1 for s in right if s.kind == kind)
        return f"The right image contains more {kind}s than the left image.", n_right > n_left
    if template == 2:
        colour = rng.choice(list(_COLOURS))
        truth = any(s.colour == colour for s in left) and any(s.colour == colour for s in right)
        return f"Both images contain at least one {colour} shape.", truth
    if template == 3:
        side, colour, kind = rng.choice(list(sides)), rng.choice(list(_COLOURS)), rng.choice(_KINDS)
        truth = any(s.colour == colour and s.kind == kind for s in sides[side])
        return f"There is a {colour} {kind} in the {side} image.", truth
    total = len(left) + len(right)
    claimed = total if rng.random() < 0.5 else total + rng.choice([-2, -1, 1, 2])
    return f"There are {claimed} shapes in total in the two images.", claimed == total


def synthetic_nlvr2(n: int, *, seed: int = 0, split: str = "train") -> list[Record]:
    """NLVR2-like records: two shape images, 2–3 true/false statements as turns (tags only in the first turn)."""
    rng = _rng("nlvr2", split, seed)
    offsets = (rng.random(), rng.random())
    records = []
    for i in range(n):
        images = []
        scenes = []
        for side, offset in enumerate(offsets):
            stride = _GOLDEN if side == 0 else math.sqrt(2) - 1
            width, height = _pick_weighted((offset + i * stride) % 1.0, TWIN_PROFILES["nlvr2"].image_sizes)  # type: ignore[misc]
            scene = _SceneSpec(width, height, _background(rng), _random_shapes(rng, rng.randint(1, 6)))
            scenes.append(scene)
            images.append(
                LazyImage(
                    functools.partial(_render_scene, scene), size=(width, height), name=f"nlvr2-{split}-{i}-{side}"
                )
            )
        turns = []
        statements: set[str] = set()
        for t in range(rng.randint(2, 3)):
            statement, truth = _nlvr2_statement(rng, scenes[0].shapes, scenes[1].shapes)
            for _ in range(20):  # a conversation should not ask the same thing twice
                if statement not in statements:
                    break
                statement, truth = _nlvr2_statement(rng, scenes[0].shapes, scenes[1].shapes)
            statements.add(statement)
            user = f"{statement}\nIs this statement true or false?"
            if t == 0:
                user = f"{image_tags(2)}\n{user}"
            turns.append(Turn(user=user, assistant="True" if truth else "False", images=images if t == 0 else []))
        records.append(
            Record(id=f"synthetic-nlvr2-{split}-{seed}-{i:06d}", source="synthetic-nlvr2", conversations=turns)
        )
    return records


_MEME_POSITIVE = ("{colour} {kind}s make my day", "everyone loves {colour} {kind}s", "{kind}s are simply the best")
_MEME_NEGATIVE = ("nobody wants {colour} {kind}s here", "{kind}s like this should disappear", "I can't stand {kind}s")


def synthetic_hateful_memes(n: int, *, seed: int = 0, split: str = "train") -> list[Record]:
    """Meme-like records: one image with a caption; "Yes" exactly when a negative caption targets the drawn shape.

    The label needs both modalities (the caption alone or the picture alone cannot decide it), like the real task.
    """
    rng = _rng("hateful_memes", split, seed)
    offset = rng.random()
    records = []
    for i in range(n):
        width, height = _pick_weighted((offset + i * _GOLDEN) % 1.0, TWIN_PROFILES["hateful_memes"].image_sizes)  # type: ignore[misc]
        kind, colour = rng.choice(_KINDS), rng.choice(list(_COLOURS))
        hateful = rng.random() < 0.5
        if hateful:
            target, template = kind, rng.choice(_MEME_NEGATIVE)
        elif rng.random() < 0.5:  # negative caption about a shape that is not in the picture
            target, template = rng.choice([k for k in _KINDS if k != kind]), rng.choice(_MEME_NEGATIVE)
        else:
            target, template = kind, rng.choice(_MEME_POSITIVE)
        caption = template.format(colour=colour, kind=target)
        shape = _Shape(kind, colour, 0.5, 0.58, 0.28)
        scene = _SceneSpec(width, height, _background(rng), (shape,), caption=caption)
        image = LazyImage(functools.partial(_render_scene, scene), size=(width, height), name=f"memes-{split}-{i}")
        user = f'{image_tags(1)}\nThe meme reads: "{caption}". Is this meme hateful? Answer yes or no.'
        records.append(
            Record(
                id=f"synthetic-hateful_memes-{split}-{seed}-{i:06d}",
                source="synthetic-hateful_memes",
                conversations=[Turn(user=user, assistant="Yes" if hateful else "No", images=[image])],
            )
        )
    return records


#: Motion classes of the UCF-101 twin (sorted, like convert_ucf101's class list).
UCF_TWIN_CLASSES = ("Grow", "MoveDown", "MoveLeft", "MoveRight", "MoveUp", "Shrink")
_UCF_FRAMES = 8


@dataclass(frozen=True)
class _VideoSpec:
    width: int
    height: int
    background: tuple[int, int, int]
    clutter: tuple[_Shape, ...]
    kind: str
    colour: str
    motion: str
    start: tuple[float, float]


def _render_frame(spec: _VideoSpec, frame: int) -> Image.Image:
    t = frame / (_UCF_FRAMES - 1)
    cx, cy = spec.start
    r = 0.12
    step = 0.45 * t
    if spec.motion == "MoveLeft":
        cx -= step
    elif spec.motion == "MoveRight":
        cx += step
    elif spec.motion == "MoveUp":
        cy -= step
    elif spec.motion == "MoveDown":
        cy += step
    elif spec.motion == "Grow":
        r = 0.06 + 0.18 * t
    else:  # Shrink
        r = 0.24 - 0.18 * t
    image = Image.new("RGB", (spec.width, spec.height), spec.background)
    draw = ImageDraw.Draw(image)
    for shape in spec.clutter:
        _draw_shape(draw, shape, spec.width, spec.height)
    _draw_shape(draw, _Shape(spec.kind, spec.colour, cx, cy, r), spec.width, spec.height)
    return image


def synthetic_ucf101(n: int, *, seed: int = 0, split: str = "train") -> list[Record]:
    """UCF-101-like records: 8 frames (320×240) of one moving shape; the class is the motion."""
    rng = _rng("ucf101", split, seed)
    prompt = ucf101_prompt(UCF_TWIN_CLASSES)
    width, height = TWIN_PROFILES["ucf101"].image_sizes[0][0]
    records = []
    for i in range(n):
        motion = UCF_TWIN_CLASSES[rng.randrange(len(UCF_TWIN_CLASSES))]
        # Start positions leave room for a 0.45 move in the class's direction.
        start = {
            "MoveLeft": (rng.uniform(0.65, 0.75), rng.uniform(0.3, 0.7)),
            "MoveRight": (rng.uniform(0.25, 0.35), rng.uniform(0.3, 0.7)),
            "MoveUp": (rng.uniform(0.3, 0.7), rng.uniform(0.65, 0.75)),
            "MoveDown": (rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.35)),
        }.get(motion, (rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)))
        clutter = tuple(
            _Shape(
                rng.choice(_KINDS), rng.choice(list(_COLOURS)), rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95), 0.03
            )
            for _ in range(rng.randint(2, 5))
        )
        spec = _VideoSpec(
            width, height, _background(rng), clutter, rng.choice(_KINDS), rng.choice(list(_COLOURS)), motion, start
        )
        frames = [
            LazyImage(functools.partial(_render_frame, spec, k), size=(width, height), name=f"ucf101-{split}-{i}-{k}")
            for k in range(_UCF_FRAMES)
        ]
        records.append(
            Record(
                id=f"synthetic-ucf101-{split}-{seed}-{i:06d}",
                source="synthetic-ucf101",
                conversations=[Turn(user=f"{image_tags(_UCF_FRAMES)}\n{prompt}", assistant=motion, images=frames)],
            )
        )
    return records


#: Task name → generator ``(n, *, seed, split) -> list[Record]``.
SYNTHETIC_TASKS: dict[str, Callable[..., list[Record]]] = {
    "docvqa": synthetic_docvqa,
    "nlvr2": synthetic_nlvr2,
    "hateful_memes": synthetic_hateful_memes,
    "ucf101": synthetic_ucf101,
}


def synthesize(task: str, n: int, *, seed: int = 0, split: str = "train") -> list[Record]:
    """Generate ``n`` records of a task's synthetic twin (deterministic in ``task``, ``split`` and ``seed``).

    Args:
        task: ``docvqa``, ``nlvr2``, ``hateful_memes`` or ``ucf101``.
        n: Number of records (>= 0).
        seed: Seed; the train and eval splits use separate streams, so they never share records.
        split: Stream name (``"train"`` or ``"eval"``); also part of the record ids.

    Returns:
        Records with lazily rendered images.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"no synthetic twin for {task!r}; choose one of {', '.join(SYNTHETIC_TASKS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return SYNTHETIC_TASKS[task](n, seed=seed, split=split)
