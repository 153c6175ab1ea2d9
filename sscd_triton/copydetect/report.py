"""report.html of `sscd-dedup`: every near-duplicate group's images side by side.

One self-contained page (no network, no script): thumbnails are embedded as base64 JPEG
data URIs made with PIL from the ids (file paths; an id that cannot be read shows "no
preview"), groups largest first, each representative marked, with the threshold, the
model that made the descriptors (from the embed output's manifest; the untrained demo
model is flagged), the counts and the inputs that failed to embed. Huge collections are
capped (`max_groups` groups of `max_members` images) and the page says how many more.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter

from sscd_triton import spec
from sscd_triton.copydetect.dedup import KEEP
from sscd_triton.files import write_atomic

MAX_GROUPS = 200
MAX_MEMBERS = 24
MAX_FAILURES = 50
THUMB = 160

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.facts td{padding:.1em .8em .1em 0;vertical-align:top}
.demo{border:3px solid #c00;background:#fee;color:#900;padding:.6em 1em;font-weight:bold}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0}
.row{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:%(w)dpx;border:2px solid #eee;border-radius:4px;padding:3px}
figure.rep{border-color:#2a7}
figure img{display:block;max-width:%(px)dpx;max-height:%(px)dpx;margin:auto}
.none{width:%(px)dpx;height:%(px)dpx;display:flex;align-items:center;justify-content:center;
background:#eee;color:#888}
figcaption{font-size:.8em;word-break:break-all}
.kept{color:#2a7;font-weight:bold}.score{font-family:monospace}
.more{color:#666;font-style:italic}
"""


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def esc(value) -> str:
    """Text as HTML (attributes included)."""
    return html.escape(str(value), quote=True)


def thumbnail_uri(path: str, size: int = THUMB) -> str | None:
    """A `data:image/jpeg;base64,...` thumbnail (at most size x size) of the image file
    at `path`, or None when it cannot be read as an image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=75)
    except Exception:  # noqa: BLE001  (any unreadable id: no preview)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _model_rows(manifest: dict | None) -> list[tuple[str, str]]:
    if not manifest:
        return [("model", "unknown (no manifest: descriptors given as arrays or an .npz)")]
    sha = manifest.get("weights_sha256")
    return [("model", f"{manifest.get('sscd_model') or 'unknown'} (served as "
                      f"{manifest.get('model') or 'unknown'}, version "
                      f"{manifest.get('model_version') or 'unknown'})"),
            ("weights sha256", sha[:16] + "..." if sha else "unknown"),
            ("preprocess", str(manifest.get("preprocess") or "unknown")),
            ("descriptor", f"{manifest.get('dims') or '?'}-d, "
                           f"{manifest.get('precision') or 'unknown precision'}")]


def _member_scores(pairs) -> dict:
    """(id, id) -> score, both orders, and id -> its best score."""
    out, best = {}, {}
    p = pairs.to_pydict()
    for a, b, s in zip(p["id_a"], p["id_b"], p["score"]):
        out[(a, b)] = out[(b, a)] = s
        best[a] = max(best.get(a, s), s)
        best[b] = max(best.get(b, s), s)
    return out, best


def render(duplicates, manifest: dict | None = None, failures=(), *, title: str = "Near-duplicates",
           descriptors: str | None = None, max_groups: int = MAX_GROUPS,
           max_members: int = MAX_MEMBERS, thumb: int = THUMB,
           thumbnails=thumbnail_uri) -> str:
    """The page as text. `duplicates`: a `copydetect.api.Duplicates` (its pairs and groups
    tables, threshold, keep, items); `manifest`: the embed output's manifest.json (None:
    unknown model); `failures`: records {"id", "reason"} of the inputs that failed to
    embed; `descriptors`: the embed output they were read from (named on the page);
    `thumbnails(id, size)`: a data URI or None."""
    groups = duplicates.groups.to_pydict()
    scores, best = _member_scores(duplicates.pairs)
    by_group: dict[int, list[tuple[str, str]]] = {}
    for gid, id_, rep in zip(groups["group_id"], groups["id"], groups["representative"]):
        by_group.setdefault(gid, []).append((id_, rep))
    n_groups, in_groups = len(by_group), len(groups["id"])
    failures = list(failures)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>",
           f"<style>{_CSS % {'w': thumb + 6, 'px': thumb}}</style></head><body>",
           f"<h1>{esc(title)}</h1>"]
    if manifest and manifest.get("sscd_model") == spec.DEMO_MODEL_NAME:
        out.append(f'<p class="demo">Warning: these descriptors come from the {esc(spec.DEMO_NOTE)}. '
                   "The groups below are not copy detection: embed with a real SSCD "
                   "checkpoint (--checkpoint).</p>")
    facts = _model_rows(manifest) + [
        ("threshold", f"score (cosine) &ge; {esc(duplicates.threshold)}, each item's "
                      f"{esc(duplicates.k)} nearest neighbours"),
        ("images", f"{duplicates.items} embedded, {len(failures)} failed to embed"
                   + (f" (everything in {descriptors}, by this run or earlier ones)"
                      if descriptors else "")),
        ("pairs", str(len(duplicates.pairs))),
        ("groups", f"{n_groups} holding {in_groups} images; keeping one per group removes "
                   f"{in_groups - n_groups}"),
        ("representative", f"{esc(duplicates.keep)}: {esc(KEEP.get(duplicates.keep, ''))}, "
                           "ties to the first in collection order")]
    out.append('<table class="facts">')
    out += [f"<tr><td>{esc(k)}</td><td>{v if k in ('threshold', 'representative') else esc(v)}"
            f"</td></tr>" for k, v in facts]
    out.append("</table>")
    if not n_groups:
        out.append("<p>No near-duplicates at this threshold.</p>")
    for gid in sorted(by_group)[:max_groups]:
        members = by_group[gid]
        rep = members[0][1]
        # the representative first, then the members by their score with it
        ordered = sorted(members, key=lambda m: (m[0] != rep, -scores.get((m[0], rep), -2.0)))
        out.append(f'<div class="group"><h2>Group {gid}: {len(members)} images</h2>'
                   '<div class="row">')
        for id_, _ in ordered[:max_members]:
            uri = thumbnails(id_, thumb)
            img = (f'<img src="{uri}" alt="{esc(id_)}">' if uri
                   else '<div class="none">no preview</div>')
            name = id_.replace("\\", "/").rsplit("/", 1)[-1]
            if id_ == rep:
                note = (f'<span class="kept">representative (kept)</span><br>best '
                        f'<span class="score">{best.get(id_, float("nan")):.3f}</span>')
            elif (id_, rep) in scores:
                note = (f'<span class="score">{scores[(id_, rep)]:.3f}</span> with the '
                        "representative")
            else:
                note = (f'best <span class="score">{best.get(id_, float("nan")):.3f}</span> '
                        "(linked through others)")
            out.append(f'<figure class="{"rep" if id_ == rep else "member"}" '
                       f'title="{esc(id_)}">{img}<figcaption>{esc(name)}<br>{note}'
                       "</figcaption></figure>")
        out.append("</div>")
        if len(members) > max_members:
            out.append(f'<p class="more">and {_n(len(members) - max_members, "more image")} in '
                       "this group (all in groups.parquet)</p>")
        out.append("</div>")
    if n_groups > max_groups:
        out.append(f'<p class="more">and {_n(n_groups - max_groups, "more group")} (all in '
                   "groups.parquet)</p>")
    if failures:
        out.append(f"<h2>{_n(len(failures), 'input')} failed to embed</h2><ul>")
        out += [f"<li>{esc(reason)}: {n}</li>" for reason, n in
                Counter(str(f.get("reason")) for f in failures).most_common()]
        out.append("</ul><ul>")
        out += [f"<li>{esc(f.get('id'))}: {esc(f.get('reason'))}</li>"
                for f in failures[:MAX_FAILURES]]
        out.append("</ul>")
        if len(failures) > MAX_FAILURES:
            out.append(f'<p class="more">and {_n(len(failures) - MAX_FAILURES, "more failure")}</p>')
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(path: str, duplicates, manifest: dict | None = None, failures=(),
                 **options) -> str:
    """`render(...)` written atomically to `path`; returns `path`."""
    return write_atomic(path, render(duplicates, manifest, failures, **options))
