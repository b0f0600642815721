"""lm-eval (EleutherAI's harness) on the thresholded model, in memory: the ``dormant`` backend, ``dormant lm-eval`` and
``dormant sweep --lm-eval-tasks``, on the tiny real Llama (stories260K) and a local task built from WikiText-2."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

from dormant.cli import main  # noqa: E402
from dormant.experiments.configs import LmEvalConfig, LmEvalRunConfig, NextSentenceTaskConfig  # noqa: E402
from dormant.experiments.lm_eval import (  # noqa: E402
    evaluate_tasks,
    main_score,
    register_backend,
    run_lm_eval,
    scores,
    task_manager,
    write_next_sentence_task,
)
from dormant.llm.configs import ModelConfig  # noqa: E402

TASK = "dormant_test_next_sentence"
LIMIT = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A model this small runs fastest on one thread (and several are slow on a busy machine)."""
    from dormant.experiments.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_next_sentence_task(NextSentenceTaskConfig(out=str(folder), items=LIMIT, name=TASK))
    return str(folder)


@pytest.fixture(scope="module")
def tasks(task_dir):
    return LmEvalConfig(tasks=[TASK], include_path=task_dir, limit=LIMIT)


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory):
    """Thresholds calibrated for 50% at the intermediate site on 4 windows of WikiText-2 validation text."""
    from dormant.llm import CalibrationConfig, calibrate, load_model
    from dormant.llm.text import load_text, make_windows

    model, tok, info = load_model("stories260k")
    windows = make_windows(tok, load_text("wikitext2-valid"), 64, 4).ids
    thr = calibrate(model, windows, CalibrationConfig("intermediate", [0.5], progress=False), model_id=info["id"])
    path = tmp_path_factory.mktemp("thr") / "thr.safetensors"
    thr.save(path)
    return str(path)


def _loglikelihoods(results) -> list[float]:
    return [float(r[0]) for s in results["samples"][TASK] for r in s["filtered_resps"]]


def test_the_local_task_is_well_formed_and_reproducible(task_dir, tmp_path):
    items = [json.loads(line) for line in open(f"{task_dir}/{TASK}.jsonl")]
    assert len(items) == LIMIT
    for it in items:
        assert len(it["choices"]) == 4 and 0 <= it["label"] < 4 and len(set(it["choices"])) == 4
        assert it["context"] and all(c and c not in it["context"] for c in it["choices"])
    again = write_next_sentence_task(NextSentenceTaskConfig(out=str(tmp_path), items=LIMIT, name=TASK))
    assert again["items"] == LIMIT and open(again["data"]).read() == open(f"{task_dir}/{TASK}.jsonl").read()
    assert TASK in task_manager(task_dir).all_tasks


def test_dense_dormant_backend_equals_lm_evals_hf_backend(tasks):
    import lm_eval

    from dormant.data import resolve

    common = dict(tasks=[TASK], limit=LIMIT, task_manager=task_manager(tasks.include_path), log_samples=True)
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={resolve('stories260k')}", device="cpu",
                                  **common)
    register_backend()
    ours = lm_eval.simple_evaluate(model="dormant", model_args="pretrained=stories260k", **common)
    assert scores(ours) == scores(ref)
    assert _loglikelihoods(ours) == _loglikelihoods(ref)  # exactly: the same model, tokens and batches


def test_thresholds_change_the_scores_the_same_in_memory_and_loaded(tasks, thresholds):
    from dormant.llm import load_model, sparsified
    from dormant.llm.thresholds import Thresholds

    model, tok, info = load_model("stories260k")
    dense = evaluate_tasks(model, tok, tasks, log_samples=True)
    with sparsified(model, Thresholds.load(thresholds), info["id"]):
        sparse = evaluate_tasks(model, tok, tasks, log_samples=True)
    assert _loglikelihoods(sparse) != _loglikelihoods(dense)
    loaded = run_lm_eval(LmEvalRunConfig(ModelConfig("stories260k"), tasks, thresholds=thresholds), log_samples=True)
    assert _loglikelihoods(loaded) == _loglikelihoods(sparse)  # the backend applies them exactly as sparsified does
    assert loaded["dormant"]["thresholds_summary"]["site"] == "intermediate"
    assert _loglikelihoods(evaluate_tasks(model, tok, tasks, log_samples=True)) == _loglikelihoods(dense)


def test_sparse_decode_keeps_loglikelihood_scores(tasks, thresholds):
    from dormant.experiments.lm_eval_backend import DormantLM
    from dormant.llm.sparse_decode import is_sparse_decode

    hooks = DormantLM(pretrained="stories260k", thresholds=thresholds)
    kernels = DormantLM(pretrained="stories260k", thresholds=thresholds, sparse_decode=True)
    assert is_sparse_decode(kernels.model) and not is_sparse_decode(hooks.model)
    import lm_eval

    common = dict(tasks=[TASK], limit=4, task_manager=task_manager(tasks.include_path))
    # multiple choice scores whole sequences: the prefill path, the hooks' thresholds, identical
    assert scores(lm_eval.simple_evaluate(model=kernels, **common)) == scores(lm_eval.simple_evaluate(model=hooks,
                                                                                                      **common))


def test_cli_writes_results(task_dir, thresholds, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["lm-eval", "--model", "stories260k", "--tasks", TASK, "--include-path", task_dir, "--limit", "4",
                 "--thresholds", thresholds, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n-samples"][TASK]["effective"] == 4 and "samples" not in res
    assert res["dormant"]["thresholds"] == thresholds and res["dormant"]["model"]["id"] == "stories260k"
    assert 0 <= res["dormant"]["scores"][TASK]["acc"] <= 1
    assert TASK in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--tasks", TASK, "--thresholds", "/nonexistent/thr.safetensors"], "does not exist"),
    ([], "name at least one lm-eval task"),
    (["--tasks", TASK, "--include-path", "/nonexistent/tasks"], "does not exist"),
    (["--tasks", TASK, "--limit", "0"], "--limit"),
    (["--tasks", "no_such_task_anywhere", "--include-path", "TASKS_DIR"], "not found"),
    (["--tasks", TASK], "--include-path"),  # the local task, without its folder
])
def test_cli_refuses_bad_input_before_loading(argv, says, task_dir, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dormant.llm.models.load_model", refuse)
    argv = [a.replace("TASKS_DIR", task_dir) for a in argv]
    assert main(["lm-eval", "--model", "stories260k", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_a_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["lm-eval", "--model", "stories260k", "--tasks", "piqa"]) == 2
    assert "dormant[eval]" in capsys.readouterr().err


def test_scores_and_main_score():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                             "acc_stderr,strict": "N/A", "exact_match,strict": 1.0}}}
    assert scores(res) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "exact_match,strict": 1.0}}
    assert main_score(scores(res)["t"]) == ("acc", 0.5)
    assert main_score({"f1": 0.3, "f1_stderr": 0.1}) == ("f1", 0.3) and main_score({}) is None


def test_sweep_adds_lm_eval_scores_beside_perplexity(task_dir, tmp_path):
    from dormant.artifacts import read_jsonl

    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "stories260k", "--seqlen", "64", "--max-windows", "2", "--calib-windows", "2",
                 "--calib-seqlen", "64", "--sites", "intermediate", "--sparsity", "0,0.5", "--lm-eval-tasks", TASK,
                 "--lm-eval-include-path", task_dir, "--lm-eval-limit", "4", "--out", str(out), "--no-progress"]) == 0
    records = read_jsonl(out / "results.jsonl")
    assert sorted(r["site"] for r in records) == ["dense", "intermediate"]
    for r in records:
        assert 0 <= r["lm_eval"][TASK]["acc"] <= 1 and r["lm_eval_seconds"] > 0
    report = (out / "report.md").read_text()
    assert f"| {TASK} acc |" in report
