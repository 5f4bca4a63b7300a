"""compress eval: the teacher-forced exact-match scorer equals greedy decoding; methods share samples."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.args import EvalArgs
from compressor.evaluation import answer_score, evaluate, text_loss
from compressor.methods import methods_at
from plans.identity import identity_from_config
from plans.schema import uniform_plan
from profilers.data.samples import Sample
from tests.conftest import tiny_model_with_tokenizer
from tests.test_synthetic import DATA

runner = CliRunner()


def _sample(prompt: list[int], answer: list[int]) -> Sample:
    ids = torch.tensor(prompt + answer)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[len(prompt):] = True
    return Sample(ids, mask)


def test_answer_score_equals_greedy_decoding():
    model, tok = tiny_model_with_tokenizer()
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        prompt = torch.randint(10, len(tok), (40,), generator=g).tolist()
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 40:].tolist()
        ok, loss, n = answer_score(model, _sample(prompt, gen))
        assert ok and n == 3 and loss > 0
        wrong = gen[:2] + [(gen[2] + 1) % len(tok)]
        ok2, loss2, _ = answer_score(model, _sample(prompt, wrong))
        assert not ok2 and loss2 > loss


def test_text_loss_matches_labels_loss():
    model, tok = tiny_model_with_tokenizer()
    ids = torch.randint(10, len(tok), (77,))
    total, count = text_loss(model, ids, chunk=16)
    with torch.no_grad():
        ref = model(ids[None], labels=ids[None]).loss
    assert count == 76 and abs(total / count - float(ref)) < 1e-4


def test_uniform_baseline_has_the_plans_density():
    model, _ = tiny_model_with_tokenizer()
    p = uniform_plan(identity_from_config(model.config), 300, sink=8)
    ms = {m.name: m.plan for m in methods_at({"p": p}, 2048, ("prefill_density",))}
    assert list(ms) == ["dense", "p", "uniform"]
    assert abs(ms["uniform"].density(2048) - p.density(2048)) < 2e-3


def test_evaluate_passkey_and_ppl_share_samples():
    model, tok = tiny_model_with_tokenizer(max_position_embeddings=8192)
    p = uniform_plan(identity_from_config(model.config), 64, sink=4)
    rep = evaluate(model, tok, {"p": p}, EvalArgs("passkey", (256,), depths=(0.2, 0.8), samples=2), haystack=[DATA.read_text()])
    rows = rep.summary()
    assert [r["method"] for r in rows] == ["dense", "p", "uniform"]
    assert all(r["samples"] == 4 for r in rows)
    rep2 = evaluate(model, tok, {"p": p}, EvalArgs("ppl", (200,), samples=1), haystack=[DATA.read_text()])
    ppl = {r["method"]: r["ppl"] for r in rep2.summary()}
    assert ppl["dense"] != ppl["p"] and all(v > 1 for v in ppl.values())


def test_cli_eval_json(tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["plan", "uniform", "--model", str(tiny_model_dir), "--span", "64", "--sink", "4",
                            "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--plan", str(tmp_path / "p.json"), "--task",
                            "retrieval", "--lengths", "600", "--depths", "0.5", "--samples", "1", "--json",
                            "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {row["method"] for row in data["summary"]} == {"dense", "p", "uniform"}
    assert (tmp_path / "ev" / "eval_retrieval.png").exists()
    r = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--task", "ppl", "--lengths", "99999"])
    assert r.exit_code == 2


def test_evaluate_ruler_task_scores_the_generated_items():
    """A RULER task through `compress eval`: the items are profilers.data.ruler's (same seeds) in held-out text, and
    each outcome is answer_score recomputed on that item."""
    from compressor.evaluation import make_samples
    from profilers.data import ruler

    model, tok = tiny_model_with_tokenizer(max_position_embeddings=2048)
    docs = [DATA.read_text()]
    rep = evaluate(model, tok, {}, EvalArgs("niah_single", (300,), depths=(0.5,), samples=2, seed=3), haystack=docs)
    samples = make_samples("niah_single", tok, [300], [0.5], 2, 3, docs)[(300, 0.5)]
    item = ruler.make_item("niah_single", tok, 300, 0.5, ruler.item_seed("niah_single", 300, 0.5, 3, 0), style="plain",
                           haystack=ruler.Haystack("text", docs[0], "heldout"))
    assert torch.equal(samples[0].input_ids, ruler.to_sample(item, tok).input_ids)
    with torch.no_grad():
        want = [answer_score(model, s)[0] for s in samples]
    assert [c.outcomes for c in rep.cells if c.method == "dense"] == [want]
