"""Query records of the paper's two external test sets, Open-I and CheXpert Plus, in their public layouts.

Each loader gives infer.py's records (records.Record): one per frontal image of a report whose
findings section is not empty, the findings as the reference, the reason for exam as the question
(the no-reason question when there is none). Layouts, sources and our selection: docs/testsets.md.
  - "openi": the Indiana University collection as the NLM distributes it (a report XML per study,
    ecgen-radiology/N.xml, and PNGs named after each image's id), or its Kaggle CSV form
    (indiana_reports.csv + indiana_projections.csv, images/images_normalized/*.png);
  - "chexpert_plus": CheXpert Plus's report table df_chexpert_plus_240401.csv, one row per image.
"""

import csv
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from llavarad.infer.records import Record
from llavarad.model.prompt import human_turn

TEST_SETS = ("openi", "chexpert_plus")
DEFAULT_SPLIT = "valid"  # CheXpert's held-out split; LLaVA-Rad trained on CheXpert's train images
REPORTS, PROJECTIONS = "indiana_reports.csv", "indiana_projections.csv"


def load_test_set(path: str | Path, loader: str, split: str | None = None, image_folder: str | Path | None = None) -> list[Record]:
    """Every record of a test set's files, checked before a model loads; an empty selection is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    if loader == "openi":
        records, where = load_openi(path), ""
    else:
        split = split or DEFAULT_SPLIT
        records, where = load_chexpert_plus(path, split, image_folder), f" in split {split!r}"
    if not records:
        raise ValueError(f"{path}: no frontal image of a report with findings{where}")
    return records


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """A CSV's rows (a pandas-written NaN reads as ""); a missing file or column is one error line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a leading BOM (Excel) is not text
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (its columns: {', '.join(reader.fieldnames or [])})")
            return [{k: v or "" for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None


def question(reason: str) -> str:
    """The human turn for a reason-for-exam text: an empty one is no reason."""
    return human_turn(reason.strip() or None)


def load_openi(path: Path) -> list[Record]:
    """Open-I in either form: `path` is a folder (holding indiana_reports.csv, or the report XMLs
    directly or under ecgen-radiology/) or the indiana_reports.csv file itself."""
    folder = path.parent if path.is_file() else path
    if path.is_file() or (folder / REPORTS).exists():
        return _openi_csv(path if path.is_file() else folder / REPORTS, folder / PROJECTIONS)
    xmls = list((folder / "ecgen-radiology").glob("*.xml")) or list(folder.glob("*.xml"))
    if not xmls:
        raise ValueError(f"{folder}: neither {REPORTS} nor report XMLs (ecgen-radiology/*.xml) for --loader openi")
    table = folder / PROJECTIONS
    views = _kaggle_views(read_table(table, ("uid", "filename", "projection"))) if table.exists() else None
    records, first_only = [], 0
    for xml in sorted(xmls, key=lambda p: (len(p.stem), p.stem)):  # 1.xml, 2.xml, ..., 10.xml
        report = _openi_xml(xml)
        if report is None:
            continue
        uid, indication, findings, images = report
        if views is None:
            frontal = images[:1]
            first_only += len(images) > 1
        else:
            frontal = [i for i in images if views.get((uid, _image_part(i))) == "Frontal"]
        records += [Record(i, f"{i}.png", question(indication), findings) for i in frontal]
    if views is None:
        print(f"warning: openi: no {PROJECTIONS} beside the report XMLs, and the XMLs do not say which image is frontal: "
              f"took each report's first listed image ({first_only} reports had more than one, and for them it may be a "
              f"lateral view); put the Kaggle form's {PROJECTIONS} in {folder} to take the frontal ones", file=sys.stderr)
    return records


def _openi_xml(path: Path) -> tuple[str, str, str, list[str]] | None:
    """(report number, indication, findings, image ids) of one NLM report XML; None without findings."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from None
    uid = root.find("uId")
    uid = "" if uid is None else uid.get("id", "")
    if not uid.startswith("CXR"):
        raise ValueError(f"{path}: no <uId id=\"CXR...\"> (not an Open-I report XML)")
    sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
    if not sections.get("FINDINGS"):
        return None
    images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
    return uid.removeprefix("CXR"), sections.get("INDICATION", ""), sections["FINDINGS"], images


def _image_part(name: str) -> str:
    """"IM-0001-4001" from an XML id ("CXR1_1_IM-0001-4001") or a Kaggle file ("1_IM-0001-4001.dcm.png")."""
    return name[name.find("IM-"):].removesuffix(".png").removesuffix(".dcm")


def _kaggle_views(rows: list[dict[str, str]]) -> dict[tuple[str, str], str]:
    """(report number, image part) -> "Frontal" / "Lateral", from indiana_projections.csv."""
    return {(r["uid"].strip(), _image_part(r["filename"])): r["projection"].strip() for r in rows}


def _openi_csv(reports_path: Path, projections_path: Path) -> list[Record]:
    """The Kaggle form: the Frontal rows of the projections table whose report has findings."""
    reports = {r["uid"].strip(): r for r in read_table(reports_path, ("uid", "indication", "findings"))}
    records = []
    for row in read_table(projections_path, ("uid", "filename", "projection")):
        report = reports.get(row["uid"].strip())
        if row["projection"].strip() == "Frontal" and report is not None and report["findings"].strip():
            records.append(Record(row["filename"], row["filename"], question(report["indication"]), report["findings"].strip()))
    return records


def load_chexpert_plus(path: Path, split: str, image_folder: str | Path | None = None) -> list[Record]:
    """The Frontal rows of `split` with a findings section, the clinical history as the reason.
    path_to_image names the original CheXpert JPEGs (".jpg"); CheXpert Plus ships PNGs at the same
    paths: with an image folder that has the .png and not the .jpg, the .png is taken."""
    rows = read_table(path, ("path_to_image", "frontal_lateral", "section_findings", "section_clinical_history", "split"))
    splits = sorted({r["split"] for r in rows})
    if split not in splits:
        raise ValueError(f"{path}: no rows in split {split!r} (its splits: {', '.join(splits) or 'none'}); choose one with --split")
    folder = Path(image_folder) if image_folder is not None else None
    records = []
    for r in rows:
        if r["split"] != split or r["frontal_lateral"] != "Frontal" or not r["section_findings"].strip():
            continue
        image = r["path_to_image"]
        if folder is not None and image.endswith(".jpg") and not (folder / image).exists() and (folder / image).with_suffix(".png").exists():
            image = image.removesuffix(".jpg") + ".png"
        records.append(Record(r["path_to_image"], image, question(r["section_clinical_history"]), r["section_findings"].strip()))
    return records
