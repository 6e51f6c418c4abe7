"""`evaluate.py --chexbert auto --radgraph auto`: the official scorer files are asked of the hub by
repo, file name and revision (huggingface_hub's download replaced by a stand-in: no network), and the
paths it returns are the ones scored with; without huggingface_hub, one error line names the files."""

import json
import sys

import huggingface_hub
import pytest
import torch
from _metrics_fixtures import chexbert_state_dict, random_bert, report_pairs, write_vocab
from _radgraph_fixtures import tiny_radgraph

import evaluate

RADGRAPH_REVISION = "d97745aa136e5beb927da7e768e99de6ae807902"  # the revision LLaVA-Rad's radgraph package pins


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Tiny stand-ins for the four official files, and a predictions file."""
    d = tmp_path_factory.mktemp("scorers")
    (d / "chexbert").mkdir()
    (d / "radgraph").mkdir()
    bert_vocab = d / "chexbert" / "vocab.txt"
    torch.save({"model_state_dict": chexbert_state_dict(random_bert(len(write_vocab(bert_vocab))))}, d / "chexbert" / "chexbert.pth")
    archive, radgraph_vocab, *_ = tiny_radgraph(d / "radgraph")  # its config.json names the BERT "tiny-bert-uncased"
    preds, refs = report_pairs(8, seed=3)
    lines = [json.dumps({"id": f"s{i}", "prediction": p, "reference": r}) for i, (p, r) in enumerate(zip(preds, refs))]
    (d / "preds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    hub = {
        ("StanfordAIMI/RRG_scorers", "chexbert.pth", None): str(d / "chexbert" / "chexbert.pth"),
        ("google-bert/bert-base-uncased", "vocab.txt", None): str(bert_vocab),
        ("StanfordAIMI/RRG_scorers", "radgraph.tar.gz", RADGRAPH_REVISION): archive,
        ("tiny-bert-uncased", "vocab.txt", None): radgraph_vocab,
    }
    return d, hub


def scores(out) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


def test_auto_downloads_the_official_files_and_scores_with_them(scorers, tmp_path, monkeypatch, capsys):
    d, hub = scorers
    asked = []

    def fake_download(repo_id, filename, revision=None, **kw):
        asked.append((repo_id, filename, revision))
        return hub[(repo_id, filename, revision)]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    common = [str(d / "preds.jsonl"), "--bootstrap", "0", "--device", "cpu", "--batch-size", "8"]
    assert evaluate.main(common + ["--chexbert", "auto", "--radgraph", "auto", "--output-dir", str(tmp_path / "auto")]) == 0
    assert asked == list(hub)  # each file once, from its repo, at its revision; the RadGraph vocab after the archive
    paths = list(hub.values())
    assert evaluate.main(common + ["--chexbert", paths[0], "--bert-vocab", paths[1], "--radgraph", paths[2],
                                   "--radgraph-vocab", paths[3], "--output-dir", str(tmp_path / "local")]) == 0
    auto, local = scores(tmp_path / "auto"), scores(tmp_path / "local")
    assert {"Micro-F1-14", "F1-RadGraph"} <= set(auto) and auto == local


def test_without_huggingface_hub_one_line_names_the_files(scorers, tmp_path, monkeypatch, capsys):
    d, _ = scorers
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub -> ImportError
    argv = [str(d / "preds.jsonl"), "--chexbert", "auto", "--radgraph", "auto", "--output-dir", str(tmp_path / "out")]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "pip install 'llavarad[hub]'" in err
    for url in ("https://huggingface.co/StanfordAIMI/RRG_scorers/resolve/main/chexbert.pth",
                "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt",
                f"https://huggingface.co/StanfordAIMI/RRG_scorers/resolve/{RADGRAPH_REVISION}/radgraph.tar.gz",
                "/vocab.txt"):
        assert url in err
    assert not (tmp_path / "out").exists()


def test_a_failed_download_is_one_line(scorers, tmp_path, monkeypatch, capsys):
    d, _ = scorers

    def offline(repo_id, filename, revision=None, **kw):  # huggingface_hub's own error without a network
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot find the requested files in the "
            "local cache. Please check your connection and try again or make sure your Internet connection is on.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert evaluate.main([str(d / "preds.jsonl"), "--chexbert", "auto", "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == ("error: --chexbert auto: downloading chexbert.pth from StanfordAIMI/RRG_scorers failed "
                   "(LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub and we cannot "
                   "find the requested files in the local cache.); where there is a network, get it (hf download "
                   "StanfordAIMI/RRG_scorers chexbert.pth --local-dir DIR, or "
                   "https://huggingface.co/StanfordAIMI/RRG_scorers/resolve/main/chexbert.pth) and pass its path")
