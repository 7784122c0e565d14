"""Image I/O: any common image file to 8-bit RGB, atomic writes, and one clear error per bad file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anti_i2v_jax.errors import ImageError, UserError

_WHITE = (255, 255, 255)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 (H, W, 3); transparency is composited on white, 16-bit scaled to 8-bit."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG and TIFF arrive as "I;16" or "I"): full range maps 65535 -> 255.
        a = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(a * (255.0 if a.max(initial=0.0) <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    # L, 1, RGB, CMYK, YCbCr, LAB, HSV: Pillow's own conversions.
    return np.asarray(img.convert("RGB"))


def load_image(path: str | Path, *, max_side: int | None = None) -> np.ndarray:
    """Read ``path`` as uint8 ``(H, W, 3)`` RGB with its EXIF orientation applied.

    ``max_side`` downscales (Lanczos) so that the longer side is at most that many pixels. Unreadable,
    truncated and non-image files raise :class:`ImageError` with a one-line message.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb8(img)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: cannot decode image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: {e}") from None
    return fit_max_side(np.ascontiguousarray(rgb), max_side)


def fit_max_side(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """``rgb`` downscaled (Lanczos) so that its longer side is at most ``max_side`` (unchanged when it fits)."""
    if max_side is None or max(rgb.shape[:2]) <= max_side:
        return rgb
    if max_side < 1:
        raise UserError(f"--max-side must be positive, got {max_side}")
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.ascontiguousarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def has_alpha(path: str | Path) -> bool:
    """Whether the image file carries transparency (an alpha channel or a transparent palette entry)."""
    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    except (OSError, UnidentifiedImageError):
        return False


def load_alpha(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """The transparency of ``path`` as uint8 ``(H, W)`` (EXIF orientation applied), resized (Lanczos) to
    ``size`` = (H, W) when given; None for an opaque image."""
    if not has_alpha(path):
        return None
    with Image.open(path) as img:
        img.load()
        alpha = ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")
    if size is not None and alpha.size != (size[1], size[0]):
        alpha = alpha.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(alpha)


def load_video(path: str | Path) -> np.ndarray:
    """Read a reference video as uint8 ``(T, H, W, 3)``: an animated image (GIF, APNG, WebP, multi-page TIFF)
    or a folder of frame images in name order. Errors are one line (:class:`ImageError`)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ImageError(f"{path}: an empty folder, expected frame images")
        frames = [load_image(f) for f in files]
    else:
        try:
            with Image.open(path) as img:
                frames = []
                for i in range(getattr(img, "n_frames", 1)):
                    img.seek(i)
                    frames.append(_to_rgb8(img.convert("RGBA") if img.mode == "P" else img.copy()))
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not a video Pillow can read (use an animated GIF/PNG/WebP or a folder of "
                             f"frames)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{path}: cannot decode video ({e})") from None
    if len({f.shape for f in frames}) > 1:
        raise ImageError(f"{path}: frames differ in size {sorted({f.shape[:2] for f in frames})}")
    return np.stack(frames)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], *, protect: Iterable[Path] = ()) -> Path:
    """Write ``path`` through a temporary file in the same folder and rename it into place.

    ``protect`` lists input files that must never be overwritten; naming one of them is an error.
    """
    path = Path(path)
    for p in map(Path, protect):
        if p.resolve() == path.resolve() or (p.exists() and path.exists() and os.path.samefile(p, path)):
            raise UserError(f"refusing to write {path}: it is an input file; choose another --out folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image(path: str | Path, image: np.ndarray, *, protect: Iterable[Path] = ()) -> Path:
    """Save a uint8 ``(H, W, 3)`` image (or ``(H, W, 4)`` with alpha) as PNG, atomically, never over a file in
    ``protect``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise UserError(f"save_image expects uint8 (H, W, 3) or (H, W, 4), got {image.dtype} {image.shape}")
    return atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"), protect=protect)


def save_video(path: str | Path, frames: np.ndarray, *, fps: int = 8, protect: Iterable[Path] = ()) -> Path:
    """Save uint8 frames ``(T, H, W, 3)`` as an animated GIF (or MP4 when imageio-ffmpeg is installed)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"save_video expects uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        import imageio.v3 as iio  # optional: needs imageio-ffmpeg

        return atomic_write(path, lambda f: f.write(iio.imwrite("<bytes>", frames, extension=".mp4", fps=fps)), protect=protect)
    images = [Image.fromarray(fr) for fr in frames]
    return atomic_write(
        path,
        lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0),
        protect=protect,
    )


def frame_grid(frames: np.ndarray, columns: int = 8) -> np.ndarray:
    """Tile ``(T, H, W, 3)`` frames into one image, ``columns`` per row, row-major in time."""
    t, h, w, c = frames.shape
    cols = min(columns, t)
    rows = -(-t // cols)
    grid = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = frame
    return grid


def save_json(path: str | Path, data: Any, *, protect: Iterable[Path] = ()) -> Path:
    """Save ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()), protect=protect)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
