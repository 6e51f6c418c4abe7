"""evaluate.py --chexprompt against the small OpenAI-compatible judge of _judge_server.py on the
loopback (never a real service): the request, retries and backoff, Retry-After, the rate limit,
the errors that stop a run and those that fail one rating, the outputs, resume after kill -9."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _judge_server import JudgeServer, Reply, rule_counts

import evaluate
from llavarad.metrics import judge as judge_module
from llavarad.metrics.chexprompt import messages
from llavarad.metrics.judge import JudgeSettings, JudgeStopped, rate_reports

ROOT = Path(__file__).resolve().parents[1]
REFS = ["Mild cardiomegaly. No effusion.", "Clear lungs.", "Small left effusion. Mild edema.", "No pneumothorax.", "Clear lungs."]
PREDS = ["Mild cardiomegaly.", "Clear lungs. Low volumes.", "Mild edema.", "Large right pneumothorax.", "Clear lungs. Low volumes."]


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch):
    for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


def settings(server: JudgeServer, **kw) -> JudgeSettings:
    return JudgeSettings("judge-test", server.url, **{"rpm": 0, "backoff": 0.01, "timeout": 5.0, **kw})


def rate(server, tmp_path, refs=REFS, preds=PREDS, **kw):
    return rate_reports([f"s{i}" for i in range(len(refs))], refs, preds, settings(server, **kw), tmp_path)


def write_predictions(path: Path, refs=REFS, preds=PREDS) -> Path:
    path.write_text("".join(json.dumps({"id": f"s{i}", "prediction": p, "reference": r}) + "\n"
                            for i, (r, p) in enumerate(zip(refs, preds))))
    return path


def run_cli(server_url, preds: Path, out: Path, *extra) -> int:
    return evaluate.main([str(preds), "--output-dir", str(out), "--bootstrap", "0", "--device", "cpu",
                          "--chexprompt", "judge-test", "--judge-url", server_url, "--judge-rpm", "0", *extra])


def expected_rating(reference, candidate):
    significant, insignificant = rule_counts(reference, candidate)
    names = ["false_positive_finding", "omission_finding", "incorrect_location", "incorrect_severity",
             "false_positive_comparison", "omission_comparison"]
    return {"clinically_significant": dict(zip(names, significant)), "clinically_insignificant": dict(zip(names, insignificant))}


def test_the_request_is_the_official_one(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with JudgeServer() as server:
        run = rate(server, tmp_path, REFS[:1], PREDS[:1])
    (request,) = server.requests
    assert request.path == "/v1/chat/completions" and request.headers["authorization"] == "Bearer sk-test"
    body = request.body
    assert body["messages"] == messages(REFS[0], PREDS[0]) and body["model"] == "judge-test"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.0, 0.9, 128)
    assert run.lines[0]["rating"] == expected_rating(REFS[0], PREDS[0]) and run.lines[0]["usage"]["requests"] == 1


def test_an_answer_the_parser_cannot_read_is_asked_again_then_fails(tmp_path):
    def plan(request, index):
        seen = sum(r.candidate == request.candidate for r in server.requests)
        if request.candidate == PREDS[0] and seen == 1 or request.candidate == PREDS[2]:
            return Reply(content="The candidate report has one error.")
    with JudgeServer(plan) as server:
        run = rate(server, tmp_path, REFS[:3], PREDS[:3])
    ok_after_one, fine, failed = run.lines
    assert ok_after_one["rating"] == expected_rating(REFS[0], PREDS[0]) and ok_after_one["usage"]["requests"] == 2
    assert fine["usage"]["requests"] == 1
    assert failed["rating"] is None and failed["answer"] == "The candidate report has one error."
    assert failed["error"] == "no answer the official parser reads, in 2 tries" and failed["usage"]["requests"] == 2
    with JudgeServer(plan) as server:
        run = rate(server, tmp_path / "none", REFS[2:3], PREDS[2:3], retries=0)
    assert len(server.requests) == 1 and run.lines[0]["rating"] is None


def test_5xx_dropped_connections_timeouts_and_429_are_retried(tmp_path, capsys):
    script = [Reply(status=500), Reply(drop=True), Reply(delay=2.5), Reply(status=429), Reply(status=503)]

    def plan(request, index):
        return script[index] if index < len(script) else None
    with JudgeServer(plan) as server:
        run = rate(server, tmp_path, REFS[:1], PREDS[:1], timeout=1.5)  # an answer takes far less, even on a busy machine
    assert len(server.requests) == 6 and run.lines[0]["usage"]["requests"] == 6
    assert run.lines[0]["rating"] == expected_rating(REFS[0], PREDS[0])
    err = capsys.readouterr().err
    assert "HTTP 500; asking again" in err and "no answer in time" in err and "HTTP 429" in err and "try 6 of 8" in err


def test_a_judge_failing_every_try_stops_the_run(tmp_path):
    with JudgeServer(lambda request, index: Reply(status=502)) as server:
        with pytest.raises(JudgeStopped, match=r"did not answer in 3 tries \(last: HTTP 502\)"):
            rate(server, tmp_path, REFS[:1], PREDS[:1], attempts=3)
    assert len(server.requests) == 3


@pytest.mark.parametrize("header,value,wait", [("Retry-After", "1", 1.0), ("retry-after-ms", "300", 0.3)])
def test_retry_after_is_honoured(tmp_path, header, value, wait):
    with JudgeServer(lambda request, index: Reply(status=429, headers={header: value}) if index == 0 else None) as server:
        rate(server, tmp_path, REFS[:1], PREDS[:1])
    first, second = server.requests
    assert second.at - first.at >= wait  # the backoff alone would be 0.01 s; the retry starts after the 429 arrived


def test_requests_stay_under_the_rpm_limit_and_the_concurrency(tmp_path):
    active, most = [0], [0]
    lock = threading.Lock()

    def plan(request, index):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
    # Arrival times here lag the client's starts by a varying delay on a busy machine, so the spacing
    # is checked over the whole run: the k-th start is at least k gaps after the first.
    refs = [f"Finding {i}." for i in range(6)]
    with JudgeServer(plan) as server:
        rate(server, tmp_path, refs, ["Clear."] * 6, rpm=1200, concurrency=2)  # one start every 0.05 s at most
    arrivals = [r.at for r in server.requests]
    assert len(arrivals) == 6 and most[0] == 2
    with JudgeServer() as server:
        rate(server, tmp_path / "slow", refs[:4], ["Clear."] * 4, rpm=200, concurrency=4)  # one start every 0.3 s
    arrivals = [r.at for r in server.requests]
    assert arrivals[-1] - arrivals[0] >= 3 * 0.3 - 0.1


@pytest.mark.parametrize("status,message", [(401, "refused the key"), (403, "refused the key"), (404, "has no model 'judge-test'")])
def test_a_wrong_key_or_model_stops_the_run_with_one_line(tmp_path, capsys, status, message):
    preds = write_predictions(tmp_path / "preds.jsonl")
    with JudgeServer(lambda request, index: Reply(status=status)) as server:
        rc = run_cli(server.url, preds, tmp_path / "out", "--judge-concurrency", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(server.requests) <= 2
    assert err[-1].startswith(f"error: the judge at 127.0.0.1 {message}") and sum(x.startswith("error") for x in err) == 1
    assert not (tmp_path / "out" / "metrics.json").exists()  # stopped before the local metrics


def test_an_unreachable_judge_is_one_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    rc = run_cli(f"http://127.0.0.1:{port}/v1", write_predictions(tmp_path / "preds.jsonl"), tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and time.monotonic() - t0 < 20  # no backoff: 8 tries would take over a minute
    assert err[-1].startswith(f"error: cannot reach the judge at http://127.0.0.1:{port}/v1") and sum(x.startswith("error") for x in err) == 1


def test_without_the_openai_package_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(judge_module, "openai", None)
    rc = run_cli("http://127.0.0.1:9/v1", write_predictions(tmp_path / "preds.jsonl"), tmp_path / "out")
    assert rc == 1 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --chexprompt needs the openai package (>= 1): pip install 'llavarad[judge]'")


def test_openai_s_own_url_needs_a_key_from_the_environment(tmp_path, capsys):
    rc = evaluate.main([str(write_predictions(tmp_path / "preds.jsonl")), "--output-dir", str(tmp_path / "out"), "--chexprompt", "gpt-4"])
    assert rc == 1 and "set OPENAI_API_KEY in the environment" in capsys.readouterr().err


def test_azure_openai(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-key")
    with JudgeServer() as server:
        rc = run_cli(server.base, write_predictions(tmp_path / "preds.jsonl", REFS[:1], PREDS[:1]), tmp_path / "out",
                     "--judge-api-version", "2024-06-01")
    (request,) = server.requests
    assert rc == 0 and request.path == "/openai/deployments/judge-test/chat/completions?api-version=2024-06-01"
    assert request.headers["api-key"] == "az-key"
    rc = evaluate.main([str(tmp_path / "preds.jsonl"), "--chexprompt", "x", "--judge-url", "https://res.openai.azure.com"])
    assert rc == 1 and "give --judge-api-version" in capsys.readouterr().err


def test_outputs_a_refused_prompt_and_a_rerun(tmp_path, capsys):
    """A 400 fails one rating and the run goes on; the figures are the hand-computed means of the
    others; a rerun asks again only for the failed one; another judge model asks for all."""
    preds = write_predictions(tmp_path / "preds.jsonl")
    out = tmp_path / "out"
    refuse = [True]
    with JudgeServer(lambda request, index: Reply(status=400, error="content filter") if request.candidate == PREDS[2] and refuse[0] else None) as server:
        assert run_cli(server.url, preds, out) == 0
        first = capsys.readouterr()
        assert len(server.requests) == 4  # s4 repeats s1's pair: asked once
        metrics = json.loads((out / "metrics.json").read_text())
        c = metrics["records"]["chexprompt"]
        assert (c["rated"], c["failed"], c["failed_ids"], c["asked"], c["reused"]) == (4, 1, ["s2"], 4, 0)
        assert "refused by the judge" in c["failed_errors"][0] and "content filter" in c["failed_errors"][0]
        # rated s0, s1, s3, s4: significant = A + B by the server's rule; by hand:
        # s0: 0 + 1 (no effusion); s1: 1 (low volumes) + 0; s3: 1 + 1; s4 as s1
        assert metrics["metrics"]["CheXprompt-significant"] == {"value": (1 + 1 + 2 + 1) / 4}
        assert metrics["metrics"]["CheXprompt-no-significant"] == {"value": 0.0}
        assert metrics["metrics"]["CheXprompt-significant/omission_finding"] == {"value": (1 + 0 + 1 + 0) / 4}
        assert metrics["metrics"]["CheXprompt-insignificant"] == {"value": 0.0}
        header = (out / "main.csv").read_text().splitlines()[0].split(",")
        assert header[1:5] == ["BLEU-1", "BLEU-4", "ROUGE-L", "ROUGE-2"] and header[5:8] == [
            "CheXprompt-significant", "CheXprompt-insignificant", "CheXprompt-no-significant"] and len(header) == 20
        rows = [json.loads(x) for x in (out / "per_report.jsonl").read_text().splitlines()]
        assert rows[2]["chexprompt"] is None and "CheXprompt-significant" not in rows[2]
        assert rows[3]["chexprompt"] == expected_rating(REFS[3], PREDS[3]) and rows[3]["CheXprompt-significant"] == 2.0
        lines = [json.loads(x) for x in (out / "chexprompt.jsonl").read_text().splitlines()]
        assert [x["id"] for x in lines] == ["s0", "s1", "s2", "s3", "s4"]  # prediction order, one per report
        assert list(lines[0])[:4] == ["id", "reference", "candidate", "rating"] and lines[2]["rating"] is None
        assert first.err.splitlines()[0] == ("CheXprompt: sending the reference and generated findings of 5 reports to "
                                             "127.0.0.1 (model judge-test) as 4 pairs (a repeated pair once)")
        assert "1 ratings failed, left out of the means: s2" in first.out and "CheXprompt-significant" in first.out

        refuse[0] = False
        assert run_cli(server.url, preds, out) == 0
        assert [r.candidate for r in server.requests[4:]] == [PREDS[2]]
        c = json.loads((out / "metrics.json").read_text())["records"]["chexprompt"]
        assert (c["rated"], c["failed"], c["asked"], c["reused"]) == (5, 0, 1, 4)

        assert run_cli(server.url, preds, out, "--chexprompt", "another-judge") == 0
        assert len(server.requests) == 5 + 4 and server.requests[-1].body["model"] == "another-judge"
    assert run_cli("http://127.0.0.1:9/v1", preds, out, "--chexprompt", "another-judge") == 0  # all reused: no request
    assert "all 5 ratings reused" in capsys.readouterr().err


def test_a_file_that_is_not_a_ratings_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "chexprompt.jsonl").write_text('{"id": 1, "note": "mine"}\n')
    rc = run_cli("http://127.0.0.1:9/v1", write_predictions(tmp_path / "preds.jsonl"), out)
    assert rc == 1 and "chexprompt.jsonl:1: not a CheXprompt ratings line" in capsys.readouterr().err
    assert (out / "chexprompt.jsonl").read_text() == '{"id": 1, "note": "mine"}\n'


def test_resume_after_kill_9_repeats_no_answered_request(tmp_path):
    """The judge holds every answer after the 4th; evaluate.py is killed with 4 ratings written and
    requests in flight. The rerun asks exactly for the reports without a rating, each once."""
    n = 12
    refs = [f"Finding number {i}." for i in range(n)]
    preds_path = write_predictions(tmp_path / "preds.jsonl", refs, ["Clear lungs."] * n)
    out = tmp_path / "out"
    release = threading.Event()
    hold = [True]

    def plan(request, index):
        if hold[0] and index >= 4:
            release.wait(30)
    command = [sys.executable, str(ROOT / "evaluate.py"), str(preds_path), "--output-dir", str(out), "--bootstrap", "0",
               "--device", "cpu", "--chexprompt", "judge-test", "--judge-concurrency", "3", "--judge-rpm", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AZURE_OPENAI_"))}
    with JudgeServer(plan) as server:
        proc = subprocess.Popen([*command, "--judge-url", server.url], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not (out / "chexprompt.jsonl").exists() or len((out / "chexprompt.jsonl").read_text().splitlines()) < 4 or len(server.requests) < 7:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        hold[0] = False
        release.set()
        written = [json.loads(x) for x in (out / "chexprompt.jsonl").read_text().splitlines()]
        asked_first = [r.reference for r in server.requests]
        assert len(written) == 4 and len(asked_first) == 7  # 4 answered, 3 in flight when killed
        assert run_cli(server.url, preds_path, out, "--judge-concurrency", "3") == 0  # the rerun, in this process
    asked_again = [r.reference for r in server.requests[7:]]
    assert sorted(asked_again) == sorted(set(refs) - {x["reference"] for x in written})  # each once, none answered before
    final = [json.loads(x) for x in (out / "chexprompt.jsonl").read_text().splitlines()]
    assert [x["id"] for x in final] == [f"s{i}" for i in range(n)] and all(x["rating"] for x in final)
    assert json.loads((out / "metrics.json").read_text())["records"]["chexprompt"]["reused"] == 4
