"""Drafting with retrieved context: the extractive drafter, comparisons, citations, the three backends."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.drafting import bleu4, rouge_l, tokens
from retrieval.rag import (
    ConsistencyChecker,
    ContextBuilder,
    EditNearestGenerator,
    ExtractiveGenerator,
    copy_nearest,
)
from retrieval.rag.context import labels_of
from retrieval.rag.http import GeneratorError, OpenAICompatibleGenerator
from retrieval.rag.prompting import build_prompt, parse_generated
from retrieval.rag.types import DraftImages
from retrieval.records import Label, LabelKey

from .conftest import save_png, synthetic_cxr

EFFUSION = "Small left pleural effusion. Heart size is normal. No pneumothorax."
EFFUSION2 = "There is a small left pleural effusion. The heart is normal in size."
NORMAL = "No pleural effusion. The lungs are clear. No acute cardiopulmonary abnormality."
CARDIO = "The heart is enlarged. No focal consolidation."


def _ctx(cases, prior=None, budget=1500):
    return ContextBuilder(budget).build(cases, prior=prior)


def _assert_grounded(draft, ctx) -> None:
    """Every sentence cites at least one case, every citation is a case of the context (or its prior, as
    "prior:<id>"), and the consistency checker finds nothing in the draft."""
    known = {c.study_id for c in ctx.cases} | ({f"prior:{ctx.prior.study_id}"} if ctx.prior else set())
    for s in draft.sentences():
        assert s.citations and set(s.citations) <= known, (s.text, s.citations, known)
    assert draft.citation_share() == 1.0
    assert ConsistencyChecker().check(draft) == []


def _statuses(draft) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in draft.sentences():
        for lab in s.labels:
            out.setdefault(f"{lab.anatomy}|{lab.finding}", set()).add(lab.status)
    return out


def test_context_deduplicates_and_respects_the_budget():
    ctx = _ctx([("a", 0.9, EFFUSION), ("b", 0.8, EFFUSION), ("c", 0.7, NORMAL)])
    assert [c.study_id for c in ctx.cases] == ["a", "b", "c"]
    assert ctx.cases[1].sentences == ()  # every sentence of b is a duplicate of a's
    assert ctx.cases[0].labels[LabelKey("left pleura", "effusion")] == "present"
    assert ctx.cases[2].labels[LabelKey("pleura", "effusion")] == "absent"
    small = _ctx([("a", 0.9, EFFUSION), ("c", 0.7, NORMAL), ("d", 0.6, CARDIO)], budget=12)
    assert [c.study_id for c in small.cases] == ["a"] and small.tokens <= 20  # first case always kept
    assert _ctx([("e", 0.9, ""), ("f", 0.8, None)]).cases == ()


def test_extractive_never_contradicts_and_cites_every_sentence():
    # two close cases say "small left effusion", one farther says "no effusion": the majority wins
    # and the "no pleural effusion" sentence must not appear beside it.
    ctx = _ctx([("a", 0.9, EFFUSION), ("b", 0.85, EFFUSION2), ("c", 0.4, NORMAL)])
    draft = ExtractiveGenerator().generate(ctx)
    text = draft.text().lower()
    assert "small left pleural effusion" in text and "no pleural effusion" not in text
    for key, states in _statuses(draft).items():
        assert len(states) == 1, f"contradiction on {key}: {states}"
    _assert_grounded(draft, ctx)
    assert [(s.text, s.citations) for s in draft.findings] == [
        ("No pneumothorax.", ("a",)),  # only a states it; c's "no pleural effusion" is not support
        ("Small left pleural effusion.", ("a", "b")),  # every case that agrees, not only its source
        ("Heart size is normal.", ("a", "b"))]
    assert all("c" not in s.citations for s in draft.sentences())  # the outvoted case supports nothing
    assert any("effusion" in s.text.lower() for s in draft.impression)
    assert "DRAFT" in draft.render() and "not a final report" in draft.render()


def test_extractive_normal_study_gives_a_normal_impression():
    ctx = _ctx([("n1", 0.9, NORMAL), ("n2", 0.8, "Heart size normal. Lungs clear. No effusion."),
                ("x", 0.3, CARDIO)])
    draft = ExtractiveGenerator().generate(ctx)
    _assert_grounded(draft, ctx)
    assert all(st == {"absent"} for st in _statuses(draft).values())
    assert [(s.text, s.citations) for s in draft.impression] == [
        ("No acute cardiopulmonary abnormality.", ("n1", "n2"))]
    assert "x" not in {c for s in draft.findings if "clear" in s.text or "effusion" in s.text for c in s.citations}


def test_comparison_with_prior_states_interval_change():
    # resolution of the prior's opacity needs cases that state it gone ("The lungs are clear."):
    # silence is not resolution (test_silent_analogs_do_not_resolve_a_prior_finding)
    cases = [("a", 0.9, "Large left pleural effusion. The heart is enlarged. The lungs are clear."),
             ("b", 0.8, "Large left pleural effusion. Cardiomegaly. No pneumothorax. The lungs are clear."),
             ("c", 0.7, "Moderate cardiomegaly. Large left pleural effusion. No pneumothorax.")]
    prior = ("p1", "Small left pleural effusion. Cardiomegaly. Right upper lobe opacity.", "2020-01-01")
    ctx = _ctx(cases, prior=prior)
    draft = ExtractiveGenerator().generate(ctx)
    _assert_grounded(draft, ctx)
    changes = {s.change: s for s in draft.interval_changes}
    assert set(changes) == {"worsened", "unchanged", "resolved"}
    assert "effusion" in changes["worsened"].text and "cardiomegaly" in changes["unchanged"].text
    assert "opacity" in changes["resolved"].text and "right lung" in changes["resolved"].text
    assert changes["resolved"].citations == ("prior:p1", "a", "b")  # the cases that state it gone
    assert changes["worsened"].citations == changes["unchanged"].citations == ("prior:p1", "a", "b", "c")
    new_ctx = _ctx(cases, prior=("p2", NORMAL, None))
    new = ExtractiveGenerator().generate(new_ctx)
    _assert_grounded(new, new_ctx)
    assert [(s.text, s.citations) for s in new.interval_changes] == [
        ("New effusion in the left pleura compared with the prior study.", ("prior:p2", "a", "b", "c")),
        ("New cardiomegaly compared with the prior study.", ("prior:p2", "a", "b", "c"))]
    assert "COMPARISON:" in new.render()


def test_copy_nearest_is_the_top_report_verbatim():
    ctx = _ctx([("a", 0.9, EFFUSION), ("c", 0.4, NORMAL)])
    d = copy_nearest(ctx)
    assert d.text() == EFFUSION and d.cases_used == [{"study_id": "a", "score": 0.9}]
    assert [s.citations for s in d.sentences()] == [("a",)] * 3  # every sentence cites the copied case
    _assert_grounded(d, ctx)


def test_parse_generated_keeps_only_known_citations():
    ctx = _ctx([("a", 0.9, EFFUSION), ("c", 0.4, NORMAL)], prior=("p", CARDIO, None))
    text = ("FINDINGS:\nSmall left pleural effusion [a, zzz]. No pneumothorax.\n"
            "Heart size is normal. [c]\nThe moon is visible.\n"
            "COMPARISON: New left effusion [prior:p].\nIMPRESSION: Left effusion [a].")
    d = parse_generated(text, ctx, "test")
    assert [s.citations for s in d.findings] == [("a",), ("a",), ("c",), ()]
    assert d.findings[1].labels == (Label("pleura", "pneumothorax", "absent"),)  # cited post hoc by agreement
    assert d.interval_changes[0].citations == ("prior:p",) and d.impression[0].citations == ("a",)
    assert "[uncited]" in d.render()  # unsupported text is shown as such, never attributed
    prompt = build_prompt(ctx, 1, 1, ["a"])
    assert "[a] (similarity 0.90)" in prompt and "Prior report [prior:p]" in prompt and "COMPARISON" in prompt


def test_draft_metrics():
    a = tokens("No pleural effusion. Heart size normal.")
    assert bleu4([a], [a]) == pytest.approx(1.0) and rouge_l(a, a) == pytest.approx(1.0)
    assert rouge_l(a, tokens("heart size normal")) == pytest.approx((1 + 1.44) * 1.0 * 0.5 / (0.5 + 1.44))
    assert bleu4([a], [tokens("completely different words here")]) < 0.05
    assert labels_of("No effusion. Possible right lower lobe pneumonia.", *_ex()) == {
        LabelKey("pleura", "effusion"): "absent", LabelKey("right lung", "pneumonia"): "uncertain"}


def _ex():
    from retrieval.entities import EntityExtractor
    from retrieval.taxonomy import default_taxonomy

    tax = default_taxonomy()
    return EntityExtractor(tax), tax


# ---- OpenAI-compatible HTTP ------------------------------------------------------------------
class _Server:
    """A local chat-completions endpoint that replays scripted (status, body) answers."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, payload = server.script.pop(0) if server.script else (500, {"error": "script exhausted"})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_http_generator_retries_then_parses_a_cited_draft():
    ctx = _ctx([("a", 0.9, EFFUSION), ("c", 0.4, NORMAL)])
    img = synthetic_cxr(0)
    script = [(503, {"error": "loading"}), (200, _reply("FINDINGS: Small left pleural effusion [a].\n"
                                                         "IMPRESSION: Left pleural effusion [a]."))]
    with _Server(script) as srv:
        gen = OpenAICompatibleGenerator(srv.url, "tiny-vlm", api_key="k3y", backoff=0.01)
        draft = gen.generate(ctx, DraftImages([img], [], [("a", img)]))
    assert len(srv.requests) == 2 and srv.requests[0]["path"] == "/v1/chat/completions"
    assert srv.requests[0]["auth"] == "Bearer k3y"
    parts = srv.requests[1]["body"]["messages"][1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert "[a] (similarity 0.90)" in parts[-1]["text"]
    assert draft.findings[0].citations == ("a",) and draft.impression[0].citations == ("a",)


def test_http_generator_errors_are_clear():
    ctx = _ctx([("a", 0.9, EFFUSION)])
    with _Server([(400, {"error": "model 'x' not found"})]) as srv:
        with pytest.raises(GeneratorError, match="HTTP 400.*not found"):
            OpenAICompatibleGenerator(srv.url, "x", backoff=0.01).generate(ctx)
        assert len(srv.requests) == 1  # a bad request is not retried
    with _Server([(500, {}), (502, {}), (503, {})]) as srv:
        with pytest.raises(GeneratorError, match="3 attempts.*HTTP 503"):
            OpenAICompatibleGenerator(srv.url, "x", retries=2, backoff=0.01).generate(ctx)
    with _Server([(200, {"unexpected": True})]) as srv:
        with pytest.raises(GeneratorError, match="unexpected response shape"):
            OpenAICompatibleGenerator(srv.url, "x").generate(ctx)
    with pytest.raises(GeneratorError, match="connection failed"):
        OpenAICompatibleGenerator("http://127.0.0.1:9/v1", "x", retries=1, backoff=0.01, timeout=2).generate(ctx)


# ---- transformers VLM from a local directory ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random-weight LLaVA built from a config, saved, to be loaded back through the real path."""
    from retrieval._compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from transformers import (
        BertTokenizerFast,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from retrieval.encoders.hf import minilm_path

    out = tmp_path_factory.mktemp("tiny-llava")
    tok = BertTokenizerFast.from_pretrained(str(minilm_path()))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1,
                          chat_template="{% for m in messages %}{% for c in m['content'] %}"
                                        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
                                        "{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    proc.save_pretrained(out)
    return out


def test_vlm_generator_loads_a_local_model_and_drafts(tiny_llava):
    from retrieval.encoders import EncoderError
    from retrieval.rag import create_generator

    gen = create_generator("vlm", model_dir=tiny_llava)
    gen.max_new_tokens = 12
    ctx = _ctx([("a", 0.9, EFFUSION), ("c", 0.4, NORMAL)], prior=("p", CARDIO, None))
    img = synthetic_cxr(1)
    d1 = gen.generate(ctx, DraftImages([img], [img], [("a", img)]))  # current + prior + 1 reference
    d2 = gen.generate(ctx, DraftImages([img], [img], [("a", img)]))
    assert d1.generator == "transformers-vlm" and [c["study_id"] for c in d1.cases_used] == ["a", "c"]
    assert d1.render() == d2.render()  # greedy decoding: same inputs, same draft
    known = {"a", "c", "prior:p"}
    assert all(set(s.citations) <= known for s in d1.sentences())  # random weights cite nothing real
    with pytest.raises(EncoderError, match="not a local transformers model directory"):
        create_generator("vlm", model_dir=tiny_llava / "missing")


# ---- the CLI, end to end: index -> retrieve -> draft -------------------------------------------
def test_cli_draft_with_prior(tmp_path, capsys):
    from api.cli import main
    from indexer.build import BuildConfig, build_index
    from indexer.manifest import write_manifest
    from retrieval.records import Study

    studies = []
    for i in range(12):
        left = i % 2 == 0
        save_png(tmp_path / f"im{i}.png", synthetic_cxr(i, left_blob=left))
        rep = ("Patchy opacity in the left lower lobe. Small left pleural effusion." if left
               else "The lungs are clear. No pleural effusion.")
        studies.append(Study(study_id=f"s{i}", images=[f"im{i}.png"], report=rep, patient_id=f"p{i}"))
    write_manifest(tmp_path / "m.jsonl", studies)
    uri = f"faiss:{tmp_path}/ix"
    build_index(tmp_path / "m.jsonl", uri, BuildConfig(encoder="pixels", text_encoder=None,
                                                        conditioning=("left lung",)), progress=False)
    query = save_png(tmp_path / "q.png", synthetic_cxr(99, left_blob=True))
    (tmp_path / "prior.txt").write_text("The lungs are clear. No pleural effusion.")
    assert main(["draft", "--index", uri, "--image", str(query), "--prior-report", str(tmp_path / "prior.txt"),
                 "--prior-study", "s1", "-k", "4", "--json", "--generator", "extractive"]) == 0
    d = json.loads(capsys.readouterr().out)
    used = {c["study_id"] for c in d["cases_used"]}
    assert "s1" not in used and len(used) == 4
    assert any("effusion" in s["text"] for s in d["findings"])
    assert any(s["text"].startswith("New effusion") and s["citations"][0] == "prior:s1" for s in d["interval_changes"])
    every = d["findings"] + d["impression"] + d["interval_changes"]
    assert every and all(s["citations"] and set(s["citations"]) <= used | {"prior:s1"} for s in every)
    assert {c for s in d["findings"] for c in s["citations"]} <= used  # findings cite retrieved cases only
    for base in ("nearest+len", "mbr+len"):  # retrieve-and-edit: every sentence cites a retrieved case
        assert main(["draft", "--index", uri, "--image", str(query), "--generator", "edit", "--edit-base", base,
                     "-k", "4", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["generator"] == base.replace("nearest+len", "edit-nearest+len")
        used = {c["study_id"] for c in d["cases_used"]}
        assert d["findings"] and all(s["citations"] and set(s["citations"]) <= used for s in d["findings"])
    assert main(["draft", "--index", uri, "--image", str(query), "--generator", "http"]) == 2
    assert "--base-url and --model" in capsys.readouterr().err


def test_eval_draft_leave_one_out(tmp_path, capsys):
    from api.cli import main
    from indexer.manifest import write_manifest
    from retrieval.records import Study

    reps = [EFFUSION, EFFUSION2, NORMAL, "No effusion. Lungs clear. No acute disease.", CARDIO,
            "Cardiomegaly. No consolidation or effusion."]
    write_manifest(tmp_path / "m.jsonl", [Study(study_id=f"r{i}", images=[], report=r) for i, r in enumerate(reps)])
    assert main(["eval", "draft", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"), "-k", "2",
                 "--bootstrap", "500"]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "o" / "draft.json").read_text())
    assert r["counts"]["queries"] == 6 and set(r["settings"]) == {"all", "no-duplicates"}
    assert r["counts"]["queries_with_exact_twin"] == 0  # six distinct texts: both settings are the same run
    assert r["settings"]["all"]["methods"] == r["settings"]["no-duplicates"]["methods"]
    res = r["settings"]["all"]
    methods = res["methods"]
    assert set(methods) == {"copy-nearest", "extractive", "extractive+check", "copy-consensus", "edit-nearest",
                            "edit-nearest+neg", "edit-consensus", "edit-nearest+len", "copy-mbr", "mbr+len"}
    assert res["drafts"] == 6 and res["reference_contradictions_per_100"] == 0.0  # six clean reports
    for m, x in methods.items():
        assert x["cited_sentence_share"] == 1.0, m
        if m not in ("extractive", "copy-nearest", "copy-consensus", "copy-mbr"):  # the drafters that run the checker
            assert x["contradictions_per_100"] == 0.0, m
    # copy-nearest copies one of these clean reports: nothing to contradict
    assert methods["copy-nearest"]["contradictions_per_100"] == 0.0
    assert methods["extractive"]["entity"]["f1"] > 0.3
    # intervals: every other method against copy-nearest, centred on the table's own difference
    vs = res["vs_copy_nearest"]
    assert vs["baseline"] == "copy-nearest" and vs["resamples"] == 500 and vs["seed"] == 0
    assert set(vs["methods"]) == set(methods) - {"copy-nearest"}
    base = methods["copy-nearest"]
    for m, iv in vs["methods"].items():
        for metric, table in (("entity_f1", lambda x: x["entity"]["f1"]), ("bleu4", lambda x: x["bleu4"]),
                              ("rougeL", lambda x: x["rougeL"])):
            d, lo, hi = iv[metric]
            assert lo <= d <= hi, (m, metric)
            assert d == pytest.approx(table(methods[m]) - table(base), abs=2e-4), (m, metric)
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("method - copy-nearest, paired bootstrap"))
    assert "500 resamples" in lines[head] and "BLEU-4 corpus-level" in lines[head]
    row = next(line for line in lines[head:] if line.startswith("edit-nearest+len"))
    f1 = vs["methods"]["edit-nearest+len"]["entity_f1"]
    assert f"{f1[0]:+.4f} [{f1[1]:+.4f}, {f1[2]:+.4f}]" in row


def test_eval_draft_separate_corpus_and_duplicate_exclusion(tmp_path):
    from eval.drafting import run
    from indexer.manifest import write_manifest
    from retrieval.records import Study

    train = [EFFUSION, EFFUSION2, NORMAL, CARDIO, "Cardiomegaly. No consolidation or effusion."]
    write_manifest(tmp_path / "train.jsonl", [Study(study_id=f"t{i}", images=[], report=r, patient_id=f"p{i}")
                                              for i, r in enumerate(train)])
    write_manifest(tmp_path / "val.jsonl", [Study(study_id="v0", images=[], report=NORMAL, patient_id="p9"),
                                            Study(study_id="v1", images=[], report=CARDIO, patient_id="p3")])
    r = run(tmp_path / "val.jsonl", tmp_path / "o", k=2, corpus=tmp_path / "train.jsonl",
            only=("copy-nearest", "edit-nearest"))
    c = r["counts"]
    assert c["queries_with_exact_twin"] == 1 and c["queries_with_same_patient_in_corpus"] == 1
    # v1's twin is also its own patient's study: excluded as the same patient, never counted as a twin
    assert c["exact_twins_removed"] == 1
    keep, drop = r["settings"]["all"]["methods"], r["settings"]["no-duplicates"]["methods"]
    assert keep["copy-nearest"]["bleu4"] >= drop["copy-nearest"]["bleu4"]
    # v0's twin (NORMAL, t2) is its nearest report with twins kept: that draft scores 1 per report
    assert keep["copy-nearest"]["rougeL"] > drop["copy-nearest"]["rougeL"]
    for st in ("all", "no-duplicates"):
        assert set(r["settings"][st]["vs_copy_nearest"]["methods"]) == {"edit-nearest"}
    none = run(tmp_path / "val.jsonl", tmp_path / "o2", k=2, corpus=tmp_path / "train.jsonl",
               only=("edit-nearest",), duplicates="exclude")  # no copy-nearest: nothing to compare with
    assert set(none["settings"]) == {"no-duplicates"} and "vs_copy_nearest" not in none["settings"]["no-duplicates"]


def test_extractive_no_contradiction_across_anatomy_levels():
    # "the lungs are clear" (lung|opacity|absent) must not stand beside a left lower lobe opacity
    ctx = _ctx([("a", 0.9, "The lungs are clear. Heart size is normal."),
                ("b", 0.85, "Patchy opacity in the left lower lobe. Heart size is normal."),
                ("c", 0.8, "Patchy opacity in the left lower lobe.")])
    draft = ExtractiveGenerator().generate(ctx)
    _assert_grounded(draft, ctx)
    text = draft.text().lower()
    assert "opacity in the left lower lobe" in text and "lungs are clear" not in text
    assert "heart size is normal" in text
    opacity = next(s for s in draft.findings if "opacity" in s.text.lower())
    assert opacity.citations == ("b", "c")  # a (lungs clear) contradicts it and is not cited


def test_comparison_with_hedged_states():
    cases = [("a", 0.9, "Possible nodule in the right upper lobe. Cardiomegaly."),
             ("b", 0.8, "Possible right upper lobe nodule. Cardiomegaly. No effusion."), ("c", 0.7, "Cardiomegaly.")]
    prior = ("p", "Nodule in the right upper lobe. Possible cardiomegaly.", None)
    ctx = _ctx(cases, prior=prior)
    draft = ExtractiveGenerator().generate(ctx)
    _assert_grounded(draft, ctx)
    texts = [s.text for s in draft.interval_changes]
    assert "Possible persistent nodule in the right lung; less definite than on the prior study." in texts
    persistent = next(s for s in draft.interval_changes if s.text.startswith("Possible persistent"))
    assert persistent.citations == ("prior:p", "a", "b")  # the prior and the cases that show it
    assert "The cardiomegaly, questioned on the prior study, is now present." in texts


def test_silent_analogs_do_not_resolve_a_prior_finding():
    """Regression (real-image comparative draft): analog cases that merely do not mention a finding
    the prior report states gave "Interval resolution of X"; silence now gives a hedged
    not-assessed line, and resolution needs enough cases stating it absent."""
    prior = ("p", "Right upper lobe opacity. Heart size is normal.", None)
    silent = [("a", 0.9, "Heart size is normal. No pleural effusion."),
              ("b", 0.8, "Heart size is normal. No pneumothorax."), ("c", 0.7, "Normal heart size.")]
    for gen in (ExtractiveGenerator(), EditNearestGenerator()):
        draft = gen.generate(_ctx(silent, prior=prior))
        _assert_grounded(draft, _ctx(silent, prior=prior))
        texts = [s.text for s in draft.interval_changes]
        assert not any("resolution" in t.lower() for t in texts), texts
        hedged = next(s for s in draft.interval_changes if "not assessed" in s.text)
        assert hedged.text.startswith("Possible persistent opacity in the right lung")
        assert hedged.change is None and hedged.citations == ("prior:p",)
        assert not ConsistencyChecker().check(draft)
    # one low-weight case saying it is gone is not enough support either
    weak = [*silent[:2], ("c", 0.2, "The lungs are clear. Normal heart size.")]
    texts = [s.text for s in ExtractiveGenerator().generate(_ctx(weak, prior=prior)).interval_changes]
    assert not any("resolution" in t.lower() for t in texts) and any("too few" in t for t in texts)
    # most of the retrieved weight stating it absent: resolution, cited with those cases
    stated = [("a", 0.9, "The lungs are clear. Heart size is normal."),
              ("b", 0.8, "No focal opacity in the right lung."), ("c", 0.7, "Normal heart size.")]
    res = [s for s in ExtractiveGenerator().generate(_ctx(stated, prior=prior)).interval_changes
           if s.change == "resolved"]
    assert [s.text for s in res] == ["Interval resolution of the opacity in the right lung."]
    assert res[0].citations == ("prior:p", "a", "b")


def test_consensus_edit_replaces_a_lone_finding_and_keeps_the_wording():
    from retrieval.rag.extractive import ConsensusEditGenerator

    base = "Heart size is normal. Calcified granuloma in the right upper lobe. No pleural effusion or pneumothorax."
    cases = [("a", 0.9, base), ("b", 0.85, "Heart size is normal. The lungs are clear. No pleural effusion."),
             ("c", 0.8, "The heart is normal. The lungs are clear. No pneumothorax."),
             ("d", 0.75, "Normal heart size. The lungs are clear.")]
    d = ConsensusEditGenerator().generate(_ctx(cases))
    _assert_grounded(d, _ctx(cases))
    # no other case states a granuloma: its sentence goes, replaced in place by the consensus's
    assert d.text() == "Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax."
    assert d.findings[1].citations == ("b", "c", "d") and not ConsistencyChecker().check(d)
    # a finding other cases state (here on the other side) keeps the nearest report's wording
    kept = [cases[0], ("b", 0.85, "Calcified granuloma in the left lung. Heart size is normal."), *cases[2:]]
    assert "Calcified granuloma in the right upper lobe." in ConsensusEditGenerator().generate(_ctx(kept)).text()
    assert copy_nearest(_ctx(cases)).text() == base


def test_every_scored_drafting_method_cites_only_retrieved_cases():
    from eval.drafting import methods

    contexts = [
        _ctx([("a", 0.9, EFFUSION), ("b", 0.85, EFFUSION2), ("c", 0.4, NORMAL)]),
        _ctx([("a", 0.9, "The lungs are clear. Heart size is normal."),
              ("b", 0.85, "Patchy opacity in the left lower lobe. Heart size is normal."),
              ("c", 0.8, "Patchy opacity in the left lower lobe.")]),
        _ctx([("n1", 0.9, NORMAL), ("n2", 0.8, "Heart size normal. Lungs clear. No effusion."), ("x", 0.3, CARDIO)]),
    ]
    unchecked = {"copy-nearest", "extractive", "copy-consensus", "copy-mbr"}  # these never run the consistency checker
    for name, draft in methods().items():
        for ctx in contexts:
            d = draft(ctx)
            assert d.sentences(), name
            if name in unchecked:
                known = {c.study_id for c in ctx.cases}
                assert all(s.citations and set(s.citations) <= known for s in d.sentences()), name
            else:
                _assert_grounded(d, ctx)


def test_mbr_base_is_the_report_most_like_the_others_and_keeps_citations():
    from retrieval.rag import create_generator
    from retrieval.rag.extractive import ConsensusEditGenerator
    from retrieval.rag.mbr import CopyMBRGenerator, bleu2, mbr_base, mbr_utilities, token_f1, words

    short = "The heart is normal. The lungs are clear."
    middle = "The heart is normal. The lungs are clear. No pleural effusion."
    long = "The heart is normal. The lungs are clear. No pleural effusion. No pneumothorax."
    cases = [("a", 0.9, short), ("b", 0.899, middle), ("c", 0.898, long)]
    ctx = _ctx(cases)
    # the middle report contains the short one and is contained in the long one: it is the closest
    # to both others under every similarity, so MBR picks it over the nearest (rank 1)
    for sim in ("rougeL", "bleu2", "f1"):
        u = mbr_utilities(ctx.cases, sim, score_weight=0.0)
        assert u[1] > max(u[0], u[2]), (sim, u)
        assert mbr_base(ctx.cases, similarity=sim, score_weight=0.0).study_id == "b"
    # token F1: a = (16/19 + 16/21) / 2, b = (16/19 + 22/24) / 2 (near-equal weights), + 15 x score
    u = mbr_utilities(ctx.cases)  # the defaults chosen on train
    assert u[1] - u[0] == pytest.approx(0.5 * (22 / 24 - 16 / 21) - 15 * 0.001, abs=2e-3)
    assert mbr_base(ctx.cases).study_id == "b"
    # a large weight on the retrieval score gives the nearest back; fewer than 3 cases: the nearest
    assert mbr_base(ctx.cases, score_weight=1000.0).study_id == "a"
    assert mbr_base(ctx.cases[:2]).study_id == "a"
    assert mbr_base(ctx.cases, pool=2).study_id == "a"
    assert bleu2(words(short), words(short)) == pytest.approx(1.0) and token_f1(words(short), []) == 0.0

    copy = CopyMBRGenerator().generate(ctx)
    assert copy.text() == middle and copy.cases_used == [{"study_id": "b", "score": 0.899}]
    assert [s.citations for s in copy.sentences()] == [("b",)] * 3  # every sentence cites the copied case
    _assert_grounded(copy, ctx)

    edit = ConsensusEditGenerator(base="mbr")
    d = edit.generate(ctx)
    assert edit.name == d.generator == "mbr+len"
    assert d.text() == middle  # nothing to edit: the others do not contradict it, and it is long enough
    _assert_grounded(d, ctx)
    assert all("b" in s.citations for s in d.sentences())  # each sentence cites the case it came from
    assert edit.pick_base(ctx).study_id == "b" and ConsensusEditGenerator().pick_base(ctx).study_id == "a"
    assert create_generator("edit", base="mbr+len").generate(ctx).text() == middle
    with pytest.raises(ValueError):
        ConsensusEditGenerator(base="mbr", mbr_similarity="cider")
