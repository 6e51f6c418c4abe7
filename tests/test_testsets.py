"""infer.py --loader openi / chexpert_plus on small files written here in the public layouts
(docs/testsets.md): frontal images of reports with findings, the reason for exam as the question,
bad files named in one line, and one run of infer.py on each."""

import csv
import json

import pytest
from _infer_fixtures import shared_tiny_release, write_images

import infer
from llavarad.infer.testsets import load_test_set
from llavarad.model.prompt import QUESTION, QUESTION_WITH_REASON

# The columns of df_chexpert_plus_240401.csv, as pandas wrote it (its index first, unnamed).
CHEXPERT_COLUMNS = [
    "", "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
    "report", "section_narrative", "section_clinical_history", "section_history", "section_comparison",
    "section_technique", "section_procedure_comments", "section_findings", "section_impression",
    "section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race", "ethnicity",
    "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split",
]


def report_xml(n: int, findings: str, indication: str, images: list[str]) -> str:
    """An NLM Open-I report (ecgen-radiology/N.xml) with the elements the loader reads, nested as in the real files."""
    parents = "".join(f'<parentImage id="{i}"><figureId>F{k}</figureId><caption>Xray Chest PA and Lateral</caption>'
                      f'<panel type="single"><url>/hadoop/storage/radiology/extract/{i}.jpg</url></panel></parentImage>'
                      for k, i in enumerate(images, 1))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/><uId id="CXR{n}"/><pmcId id="{n}"/>'
            f'<docSource>CXR</docSource><IUXRId id="{n}"/><MedlineCitation Owner="Indiana University"><Article PubModel="Electronic">'
            f'<ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle><Abstract>'
            f'<AbstractText Label="COMPARISON">None.</AbstractText><AbstractText Label="INDICATION">{indication}</AbstractText>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText><AbstractText Label="IMPRESSION">Normal chest x-XXXX.</AbstractText>'
            f'</Abstract></Article></MedlineCitation><MeSH><major>normal</major></MeSH>{parents}</eCitation>\n')


OPENI = [  # (report, findings, indication, images as the XML lists them, the frontal ones)
    (1, "The cardiac silhouette is normal. No effusion.", "Positive TB test", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"], ["CXR1_1_IM-0001-4001"]),
    (2, "Borderline cardiomegaly.", "", ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"], ["CXR2_IM-0652-1001"]),
    (3, "", "Chest pain", ["CXR3_IM-1384-1001"], []),  # no findings
    (10, "Clear lungs.", "XXXX-year-old male, cough.", ["CXR10_IM-0002-1001-0001", "CXR10_IM-0002-1001-0002"], ["CXR10_IM-0002-1001-0002"]),
    (11, "No acute disease.", "Dyspnea", [], []),  # no image
]
KAGGLE_PROJECTIONS = [  # Kaggle's names drop the XML's "CXR" and add ".dcm.png"; report 1's also drops the repeated "1_"
    ("1", "1_IM-0001-4001.dcm.png", "Frontal"), ("1", "1_IM-0001-3001.dcm.png", "Lateral"),
    ("2", "2_IM-0652-1001.dcm.png", "Frontal"), ("2", "2_IM-0652-2001.dcm.png", "Lateral"),
    ("3", "3_IM-1384-1001.dcm.png", "Frontal"),
    ("10", "10_IM-0002-1001-0001.dcm.png", "Lateral"), ("10", "10_IM-0002-1001-0002.dcm.png", "Frontal"),
]


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture
def openi_xml(tmp_path):
    folder = tmp_path / "openi"
    (folder / "ecgen-radiology").mkdir(parents=True)
    for n, findings, indication, images, _ in OPENI:
        (folder / "ecgen-radiology" / f"{n}.xml").write_text(report_xml(n, findings, indication, images), encoding="utf-8")
    return folder


def test_openi_xml_with_the_projections_table(openi_xml, capsys):
    write_csv(openi_xml / "indiana_projections.csv", ["uid", "filename", "projection"], KAGGLE_PROJECTIONS)
    records = load_test_set(openi_xml, "openi")
    assert [r.id for r in records] == [i for *_, frontal in OPENI for i in frontal]
    assert [r.image for r in records] == ["CXR1_1_IM-0001-4001.png", "CXR2_IM-0652-1001.png", "CXR10_IM-0002-1001-0002.png"]
    assert records[0].question == QUESTION_WITH_REASON.format(reason="Positive TB test")
    assert records[1].question == QUESTION  # an empty indication is no reason
    assert records[2].reference == "Clear lungs." and "warning" not in capsys.readouterr().err


def test_openi_xml_without_the_table_takes_the_first_image_and_says_so(openi_xml, capsys):
    records = load_test_set(openi_xml, "openi")
    assert [r.id for r in records] == ["CXR1_1_IM-0001-3001", "CXR2_IM-0652-1001", "CXR10_IM-0002-1001-0001"]
    err = capsys.readouterr().err
    assert "took each report's first listed image (3 reports had more than one" in err and "indiana_projections.csv" in err


def test_openi_kaggle_csv_form(tmp_path):
    reports = [("1", "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test", "None.", "The lungs are clear.", "Normal."),
               ("2", "normal", "normal", "Chest, 2 views", "", "None.", "Borderline cardiomegaly.", "No acute findings."),
               ("3", "normal", "normal", "PA and lateral", "Chest pain", "", "", "Heart size is normal.")]
    write_csv(tmp_path / "indiana_reports.csv", ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"], reports)
    write_csv(tmp_path / "indiana_projections.csv", ["uid", "filename", "projection"], KAGGLE_PROJECTIONS)
    for where in (tmp_path, tmp_path / "indiana_reports.csv"):
        records = load_test_set(where, "openi")
        assert [(r.id, r.image) for r in records] == [("1_IM-0001-4001.dcm.png",) * 2, ("2_IM-0652-1001.dcm.png",) * 2]
        assert records[0].question == QUESTION_WITH_REASON.format(reason="Positive TB test") and records[1].question == QUESTION
        assert records[0].reference == "The lungs are clear."


def chexpert_row(path, view, findings, history, split):
    row = dict.fromkeys(CHEXPERT_COLUMNS, "")
    row.update({"path_to_image": path, "path_to_dcm": path.replace(".jpg", ".dcm"), "frontal_lateral": view,
                "ap_pa": "AP" if view == "Frontal" else "LL", "section_findings": findings,
                "section_clinical_history": history, "split": split, "report": f"FINDINGS: {findings}"})
    return [row[c] for c in CHEXPERT_COLUMNS]


CHEXPERT = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "Mild cardiomegaly. ", "Shortness of breath.", "valid"),
    ("valid/patient64541/study1/view2_lateral.jpg", "Lateral", "Mild cardiomegaly. ", "Shortness of breath.", "valid"),
    ("valid/patient64542/study1/view1_frontal.jpg", "Frontal", "", "Fever.", "valid"),  # impression only
    ("valid/patient64543/study1/view1_frontal.jpg", "Frontal", "No pneumothorax.", "", "valid"),
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "Clear lungs.", "Cough.", "train"),
]


def test_chexpert_plus(tmp_path):
    table = write_csv(tmp_path / "df_chexpert_plus_240401.csv", CHEXPERT_COLUMNS, [chexpert_row(*r) for r in CHEXPERT])
    records = load_test_set(table, "chexpert_plus")
    assert [r.id for r in records] == [CHEXPERT[0][0], CHEXPERT[3][0]] and records[0].image == CHEXPERT[0][0]
    assert records[0].question == QUESTION_WITH_REASON.format(reason="Shortness of breath.") and records[0].reference == "Mild cardiomegaly."
    assert records[1].question == QUESTION
    assert [r.id for r in load_test_set(table, "chexpert_plus", split="train")] == [CHEXPERT[4][0]]
    png = tmp_path / "PNG" / "valid/patient64541/study1/view1_frontal.png"  # the PNG release: .png at the same path
    png.parent.mkdir(parents=True)
    png.write_bytes(b"")
    records = load_test_set(table, "chexpert_plus", image_folder=tmp_path / "PNG")
    assert records[0].image == "valid/patient64541/study1/view1_frontal.png" and records[0].id == CHEXPERT[0][0]
    assert records[1].image == CHEXPERT[3][0]  # neither file there: as written (infer reports it missing)


def test_bad_files_are_one_line_naming_the_file(tmp_path, openi_xml):
    table = write_csv(tmp_path / "chexpert.csv", ["path_to_image", "split"], [["a.jpg", "valid"]])
    with pytest.raises(ValueError, match=r"chexpert.csv: no column 'frontal_lateral', 'section_findings'"):
        load_test_set(table, "chexpert_plus")
    full = write_csv(tmp_path / "full.csv", CHEXPERT_COLUMNS, [chexpert_row(*CHEXPERT[4])])
    with pytest.raises(ValueError, match=r"full.csv: no rows in split 'valid' \(its splits: train\); choose one with --split"):
        load_test_set(full, "chexpert_plus")
    (openi_xml / "ecgen-radiology" / "2.xml").write_text("<eCitation><uId id='CXR2'/>", encoding="utf-8")
    with pytest.raises(ValueError, match=r"2.xml: not valid XML"):
        load_test_set(openi_xml, "openi")
    with pytest.raises(ValueError, match=r"neither indiana_reports.csv nor report XMLs"):
        load_test_set(tmp_path, "openi")
    (tmp_path / "latin1.csv").write_bytes(",".join(CHEXPERT_COLUMNS).encode() + b"\n\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.csv: not UTF-8 text \(byte 0xe9\)"):
        load_test_set(tmp_path / "latin1.csv", "chexpert_plus")


def test_infer_runs_on_both_test_sets(tmp_path_factory, tmp_path, capsys):
    tiny = shared_tiny_release(tmp_path_factory)
    png = tmp_path / "chexpert" / "PNG"
    names = write_images(png, 2)
    rows = [chexpert_row(f"valid/p{i}/study1/view1_frontal.jpg", "Frontal", "Clear lungs.", "Cough." if i else "", "valid") for i in range(2)]
    for i, name in enumerate(names):  # the PNG release's files, at path_to_image with .png
        (png / f"valid/p{i}/study1").mkdir(parents=True)
        (png / name).rename(png / f"valid/p{i}/study1/view1_frontal.png")
    table = write_csv(tmp_path / "chexpert" / "df_chexpert_plus_240401.csv", CHEXPERT_COLUMNS, rows)
    common = ["--model", str(tiny.release), "--base", str(tiny.base), "--max-new-tokens", "3", "--workers", "0"]
    out = tmp_path / "chexpert.jsonl"
    assert infer.main(["--query-file", str(table), "--loader", "chexpert_plus", "--split", "valid", "--image-folder", str(png),
                       "--output", str(out), *common]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["valid/p0/study1/view1_frontal.jpg", "valid/p1/study1/view1_frontal.jpg"]
    assert all(g["reference"] == "Clear lungs." and "prediction" in g for g in got) and got[1]["query"].endswith("indication: Cough.")

    openi = tmp_path / "openi"  # the NLM form: XMLs and PNGs in one folder, the image folder by default
    (openi / "ecgen-radiology").mkdir(parents=True)
    (openi / "ecgen-radiology" / "7.xml").write_text(report_xml(7, "No effusion.", "Cough", ["CXR7_IM-0001-1001"]), encoding="utf-8")
    (name,) = write_images(openi / "tmp", 1)
    (openi / "tmp" / name).rename(openi / "CXR7_IM-0001-1001.png")
    out = tmp_path / "openi.jsonl"
    assert infer.main(["--query-file", str(openi), "--loader", "openi", "--output", str(out), *common]) == 0
    (got,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert got["id"] == "CXR7_IM-0001-1001" and got["reference"] == "No effusion." and "prediction" in got


def test_split_is_for_chexpert_plus_only(capsys):
    with pytest.raises(SystemExit) as e:
        infer.parse_args(["--query-file", "q.json", "--output", "o.jsonl", "--split", "valid"])
    assert e.value.code == 2 and "--split goes with --loader chexpert_plus" in capsys.readouterr().err


def test_a_csv_saved_with_a_byte_order_mark_loads(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM; the first column (here path_to_image, without
    pandas' index column) keeps its name."""
    rows = [chexpert_row(*r)[1:] for r in CHEXPERT]
    plain = write_csv(tmp_path / "plain.csv", CHEXPERT_COLUMNS[1:], rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert [r.id for r in load_test_set(bom, "chexpert_plus")] == [r.id for r in load_test_set(plain, "chexpert_plus")]
