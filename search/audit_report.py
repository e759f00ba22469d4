"""The audit's report: ``audit.csv`` (one finding a line) and ``audit.html`` (each finding's two
photos side by side with their similarity maps, every image embedded as a data URI: the page
opens offline, from anywhere, and links to no file of the audited folder).

The maps are the demo's "Show why" (`search.engine.SearchEngine.explain`): for a finding (i, j),
photo i's map shows where it matches photo j's embedding and photo j's where it matches i's.
"""

import base64
import csv
import html
import io

from PIL import Image
from tqdm.auto import tqdm

from dataio import fileio, photos
from search.engine import SearchEngine
from search.query import QueryError

CSV_COLUMNS = ("kind", "path", "other_path", "product_id", "other_product_id", "score")
THUMB_QUALITY = 85  # JPEG quality of the embedded views: a few KB each


def finding_table(findings, rel_paths, product_ids, unreadable, photos_):
    """audit.csv's rows (dicts of CSV_COLUMNS, plus ``row`` / ``other_row``: the photos' rows in
    ``rel_paths``): the findings in order, then the unreadable photos (`search.audit.Finding`
    with ``row`` their position in the catalogue ``photos_``)."""
    table = []
    for f in findings:
        table.append(
            {
                "kind": f.kind,
                "path": rel_paths[f.row],
                "other_path": rel_paths[f.other_row],
                "product_id": product_ids[f.row],
                "other_product_id": product_ids[f.other_row],
                "score": f"{f.score:.6f}",
                "row": f.row,
                "other_row": f.other_row,
            }
        )
    for f in unreadable:
        table.append(
            {
                "kind": "unreadable",
                "path": photos_.paths[f.row],
                "other_path": "",
                "product_id": photos_.product_ids[f.row],
                "other_product_id": "",
                "score": "",
                "row": -1,
                "other_row": -1,
            }
        )
    return table


def write_csv(path, table):
    """audit.csv: header CSV_COLUMNS, one finding a line."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
    fileio.atomic_write_text(path, text.getvalue())


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def finding_images(engine, i, j):
    """[photo i, its map, photo j's map, photo j] of a finding (PIL, the model's view), ``i`` and
    ``j`` the two photos' rows in the engine's gallery index."""
    query = engine.abs_paths[i]
    result = engine.explain(query, j)
    view_i = engine.pixels(photos.load_image(query, size=engine.resize))
    view_j = engine.pixels(photos.load_image(engine.abs_paths[j], size=engine.resize))
    return [Image.fromarray(view_i), result["query_overlay"], result["result_overlay"], Image.fromarray(view_j)]


def finding_html(n, entry, images):
    """One finding as an HTML block (texts escaped)."""
    e = {k: html.escape(str(v)) for k, v in entry.items()}
    caption = (
        f"<p><b>#{n} {e['kind']}</b> score {e['score']}: <code>{e['path']}</code> (product "
        f"{e['product_id']}) &harr; <code>{e['other_path']}</code> (product {e['other_product_id']})</p>"
    )
    if not images:
        return f"<div class=f>{caption}<p><i>{html.escape(entry.get('note', ''))}</i></p></div>"
    titles = ("photo", "where it matches the other", "where the other matches it", "other photo")
    cells = "".join(
        f'<figure><img src="{data_uri(im)}"><figcaption>{t}</figcaption></figure>' for im, t in zip(images, titles)
    )
    return f"<div class=f>{caption}<div class=row>{cells}</div></div>"


STYLE = (
    "body{font-family:sans-serif;margin:1em}div.row{display:flex;gap:6px}figure{margin:0}"
    "img{width:180px;height:180px}figcaption{font-size:11px}div.f{border-bottom:1px solid #ccc;"
    "padding:6px 0}code{font-size:12px}"
)


def summary_html(summary, table):
    counts = {k: sum(r["kind"] == k for r in table) for k in ("duplicate", "mislabelled", "unreadable")}
    lines = [
        f"<h1>Catalogue audit</h1><p>{html.escape(summary['root'])}: {summary['photos']} photos, "
        f"{summary['products']} products, model <code>{html.escape(str(summary['model'])[:60])}</code></p>",
        "<p>" + ", ".join(f"{v} {k}" for k, v in counts.items()) + "</p>",
    ]
    if "message" in summary:
        lines.append(f"<p><b>{html.escape(summary['message'])}</b></p>")
    for key in ("duplicate_threshold", "pixel_threshold", "margin_threshold"):
        if key in summary:
            lines.append(f"<p>{key.replace('_', ' ')}: {summary[key]:.4f} (derived: see docs/audit.md)</p>")
    return "".join(lines)


def write_html(path, table, summary, loaded, index, root, limit=50, progress=True):
    """audit.html: the summary, then up to ``limit`` findings of each kind with their images
    (the unreadable photos are listed by name)."""
    engine = SearchEngine(loaded.model, index, root) if any(r["row"] >= 0 for r in table) else None
    row_of = {p: r for r, p in enumerate(index.paths)}
    blocks, shown = [summary_html(summary, table)], {}
    for entry in tqdm(table, desc="report", unit="finding", disable=not progress, dynamic_ncols=True, leave=False):
        shown[entry["kind"]] = shown.get(entry["kind"], 0) + 1
        if shown[entry["kind"]] > limit:
            continue
        images = []
        if entry["row"] >= 0:
            try:
                images = finding_images(engine, row_of[entry["path"]], row_of[entry["other_path"]])
            except (QueryError, *photos.IMAGE_ERRORS, FileNotFoundError) as e:
                entry = {**entry, "note": f"images unavailable: {e}"}
        blocks.append(finding_html(shown[entry["kind"]], entry, images))
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>Catalogue audit</title><style>{STYLE}"
        f"</style></head><body>{''.join(blocks)}</body></html>"
    )
    fileio.atomic_write_text(path, page)
