"""The offline stand-ins are real: a corpus with IMDB's schema, a tiny GPT-NeoX that loads in 8-bit, a classifier.

The three fixtures are built once for the whole session, in a private cache (~30 s on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path

import pytest
import torch

from rlhf import fixtures
from rlhf.fixtures import FixturePaths, common, corpus, ensure_fixtures, neox
from rlhf.fixtures import classifier as classifier_fixture

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")  # bitsandbytes on CPU casts fp32 inputs to fp16

# The reference PPO generation settings: pure sampling from the model's distribution. No pad token: use EOS (0).
SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 1.0, "pad_token_id": 0}


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> FixturePaths:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE", str(tmp_path_factory.mktemp("rlhf-cache")))
        return ensure_fixtures(seed=0, progress=False)


@pytest.fixture(scope="session")
def policy_tokenizer(built: FixturePaths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built.policy)


@pytest.fixture(scope="session")
def policy(built: FixturePaths):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(built.policy).eval()


@pytest.fixture(scope="session")
def classifier(built: FixturePaths):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoTokenizer.from_pretrained(built.reward), AutoModelForSequenceClassification.from_pretrained(built.reward)


@pytest.fixture(scope="session")
def test_rows(built: FixturePaths) -> list[dict]:
    return fixtures.load_split(built.imdb, "test")


def classifier_logits(classifier, texts: list[str]) -> torch.Tensor:
    tokenizer, model = classifier
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def positive_logits(classifier, texts: list[str]) -> torch.Tensor:
    """The PPO reward: the raw POSITIVE logit, picked by label name."""
    return classifier_logits(classifier, texts)[:, classifier[1].config.label2id["POSITIVE"]]


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# --- names, paths, cache ---------------------------------------------------------------------------------------------


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    assert fixtures.cache_root() == tmp_path
    monkeypatch.delenv("RLHF_CACHE")
    assert fixtures.cache_root().name == "rlhf"


def test_layout_and_names(built: FixturePaths) -> None:
    root = built.imdb.parent
    assert root.name == f"fixtures-{fixtures.FIXTURES_VERSION}-seed0"
    assert (built.imdb.name, built.policy.name, built.reward.name) == ("imdb", "tiny-gpt-neox", "tiny-distilbert-imdb")
    assert built.policy.parent == built.reward.parent == root
    built_names = {fixtures.FIXTURE_NAMES[name] for name in fixtures.FIXTURE_NAMES if name not in fixtures.ON_DEMAND}
    assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == built_names
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # no leftovers of the atomic builds
    assert all(fixtures.is_fixture(name) for name in fixtures.FIXTURE_NAMES)
    assert not fixtures.is_fixture("stanfordnlp/imdb")
    with pytest.raises(ValueError, match="fixture:tiny-gpt-neox"):
        fixtures.resolve_fixture("fixture:gpt2")


def test_second_call_is_a_cache_hit(built: FixturePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_CACHE", str(built.imdb.parent.parent))
    mtimes = {p: p.stat().st_mtime_ns for d in (built.imdb, built.policy, built.reward) for p in d.iterdir()}
    start = time.perf_counter()
    assert ensure_fixtures(seed=0) == built
    assert fixtures.resolve_fixture("fixture:tiny-gpt-neox") == built.policy
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        (out / "half-written.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        common.build_once(tmp_path / "artifact", broken, "broken artifact", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".artifact.lock"]


def test_build_is_deterministic_and_reports_progress(
    built: FixturePaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two more builds from scratch, with short training (the same code; the full run takes ~30 s).
    monkeypatch.setattr(neox, "PRETRAIN_STEPS", 5)
    monkeypatch.setattr(classifier_fixture, "CLASSIFIER_STEPS", 5)
    builds = []
    for i in range(2):
        monkeypatch.setenv("RLHF_CACHE", str(tmp_path / f"cache{i}"))
        builds.append(ensure_fixtures(seed=0, progress=True))
    assert "building fixture: tiny-gpt-neox" in capsys.readouterr().err
    for name in ("imdb", "policy", "reward"):
        a, b = getattr(builds[0], name), getattr(builds[1], name)
        assert file_hashes(a) == file_hashes(b), name  # corpus, tokenizers and trained weights, byte for byte
    # The corpus and both tokenizers do not depend on training length: equal to the full build's.
    assert file_hashes(builds[0].imdb) == file_hashes(built.imdb)
    for short, full in ((builds[0].policy, built.policy), (builds[0].reward, built.reward)):
        assert (short / "tokenizer.json").read_bytes() == (full / "tokenizer.json").read_bytes()


def test_another_seed_gives_another_corpus() -> None:
    first = corpus.make_split(random.Random("imdb-0"), 20)
    assert first == corpus.make_split(random.Random("imdb-0"), 20)
    assert first != corpus.make_split(random.Random("imdb-1"), 20)


# --- the corpus ------------------------------------------------------------------------------------------------------


def test_corpus_has_imdb_schema(built: FixturePaths, tmp_path: Path) -> None:
    import datasets

    files = {split: str(built.imdb / f"{split}.jsonl") for split in ("train", "test")}
    ds = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path))
    assert set(ds) == {"train", "test"}
    assert (ds["train"].num_rows, ds["test"].num_rows) == (4000, 1000)
    for split in ds.values():
        assert split.column_names == ["text", "label"]
        assert split.features["label"].dtype == "int64"
        assert sum(split["label"]) == split.num_rows // 2  # balanced
    lengths = [len(text) for text in ds["train"]["text"]]
    assert sum(n > 200 for n in lengths) / len(lengths) > 0.8  # the PPO prompt filter keeps most reviews
    assert "stand-in for stanfordnlp/imdb" in (built.imdb / "README.md").read_text()


def test_reviews_open_neutral_and_follow_their_label(test_rows: list[dict]) -> None:
    for row in test_rows:
        opener = row["text"].split(". ")[0]
        assert fixtures.cue_balance(opener) == 0, opener
    agree = sum((fixtures.cue_balance(row["text"]) > 0) == (row["label"] == 1) for row in test_rows)
    assert agree / len(test_rows) > 0.97
    assert not corpus.POSITIVE_CUES & corpus.NEGATIVE_CUES


# --- the policy ------------------------------------------------------------------------------------------------------


def test_policy_tokenizer_is_like_gpt_neox(built: FixturePaths, policy_tokenizer, policy) -> None:
    tok = policy_tokenizer
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token is None
    assert tok.eos_token_id == policy.config.eos_token_id == policy.generation_config.eos_token_id == 0
    assert 1500 <= len(tok) == policy.config.vocab_size <= 4096
    for text in ["I watched this film last weekend. The acting is superb.", "Zürich — 12€, naïve ✓"]:
        ids = tok(text)["input_ids"]
        assert ids[0] != tok.eos_token_id  # no BOS added, as with gpt-neox-20b
        assert tok.decode(ids) == text  # byte-level: any text round-trips
    assert len(tok("I watched this film")["input_ids"]) == 4  # whole words are single tokens


def test_policy_is_a_float32_gpt_neox(built: FixturePaths, policy) -> None:
    config = policy.config
    assert config.model_type == "gpt_neox" and config.use_parallel_residual and not config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (64, 4, 256)
    assert (built.policy / "model.safetensors").is_file() and (built.policy / "generation_config.json").is_file()
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_policy_learned_the_reviews(policy_tokenizer, policy, test_rows: list[dict]) -> None:
    blocks = neox.lm_blocks(policy_tokenizer, [row["text"] for row in test_rows[:200]], 64)
    with torch.no_grad():
        loss = policy(input_ids=blocks, labels=blocks).loss.item()
    assert loss < 0.3 * math.log(len(policy_tokenizer))  # uniform guessing would be ln(vocab) ~ 7.6


def test_policy_loads_in_8bit_and_samples(built: FixturePaths, policy_tokenizer, policy) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        built.policy, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(int8) == 4 * model.config.num_hidden_layers  # qkv, dense, h_to_4h, 4h_to_h in each layer
    assert all(m.weight.dtype == torch.int8 for m in int8)
    ids = policy_tokenizer("I watched this film last weekend. The acting is superb.", return_tensors="pt")
    with torch.no_grad():
        loss_int8 = model(**ids, labels=ids["input_ids"]).loss.item()
        loss_fp32 = policy(**ids, labels=ids["input_ids"]).loss.item()
    assert loss_int8 == pytest.approx(loss_fp32, abs=0.05)  # quantized, still the same model
    torch.manual_seed(0)
    out = model.generate(
        **policy_tokenizer("I watched", return_tensors="pt"), **SAMPLING, max_new_tokens=12, min_new_tokens=12
    )
    assert out.shape == (1, 2 + 12)
    assert policy_tokenizer.decode(out[0]).startswith("I watched")


def test_base_policy_is_undecided_about_sentiment(policy_tokenizer, policy, classifier, test_rows) -> None:
    # PPO must have room to move it: continuations of neutral openers are positive only some of the time.
    # Prompts of 2-8 tokens, responses of 4-16 (the reference PPO settings); one generate call per prompt length.
    rng = random.Random(0)
    torch.manual_seed(0)
    samples = [(row["text"], rng.randint(2, 8), rng.randint(4, 16)) for row in test_rows[:96]]
    texts = []
    for prompt_len in range(2, 9):
        group = [(text, n_new) for text, length, n_new in samples if length == prompt_len]
        if not group:
            continue
        prompts = torch.tensor([policy_tokenizer(text)["input_ids"][:prompt_len] for text, _ in group])
        out = policy.generate(
            prompts, attention_mask=torch.ones_like(prompts), **SAMPLING, min_new_tokens=16, max_new_tokens=16
        )
        texts += [
            policy_tokenizer.decode(ids[: prompt_len + n_new]) for ids, (_, n_new) in zip(out, group, strict=True)
        ]
    predicted = classifier_logits(classifier, texts).argmax(-1)
    positive_rate = (predicted == classifier[1].config.label2id["POSITIVE"]).float().mean().item()
    assert 0.2 < positive_rate < 0.8


# --- the classifier --------------------------------------------------------------------------------------------------


def test_classifier_is_a_distilbert_with_its_own_tokenizer(built: FixturePaths, classifier, policy_tokenizer) -> None:
    tokenizer, model = classifier
    assert model.config.model_type == "distilbert"
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert model.config.label2id == {"NEGATIVE": 0, "POSITIVE": 1}
    assert tokenizer.pad_token == "[PAD]" and tokenizer.cls_token == "[CLS]" and tokenizer.mask_token == "[MASK]"
    assert tokenizer.get_vocab() != policy_tokenizer.get_vocab()
    encoded = tokenizer("The Acting is SUPERB")
    assert set(encoded) == {"input_ids", "attention_mask"}  # DistilBERT takes no token_type_ids
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["[CLS]", "the", "acting", "is", "superb", "[SEP]"]


def test_classifier_is_accurate_on_test_reviews(classifier, test_rows: list[dict]) -> None:
    correct = 0
    for i in range(0, len(test_rows), 250):
        rows = test_rows[i : i + 250]
        predicted = classifier_logits(classifier, [row["text"] for row in rows]).argmax(-1)
        correct += (predicted == torch.tensor([row["label"] for row in rows])).sum().item()
    assert correct / len(test_rows) >= 0.95


def test_classifier_ranks_short_positive_texts_above_negative(classifier, test_rows: list[dict]) -> None:
    positive = ["The acting is superb.", "I loved this movie.", "What a wonderful film!", "Watching it was a joy."]
    negative = ["The acting is wooden.", "I hated this movie.", "What a boring film!", "Watching it was a chore."]
    assert positive_logits(classifier, positive).min() > positive_logits(classifier, negative).max()
    # Short fragments of unseen reviews, as PPO will score: the POSITIVE logit separates them by their sentiment.
    rng = random.Random(0)
    spans = [span for row in test_rows[:200] for span in classifier_fixture.fragments(rng, row["text"], 2)]
    pos = positive_logits(classifier, [text for text, target in spans if target == 1.0])
    neg = positive_logits(classifier, [text for text, target in spans if target == 0.0])
    auc = (pos[:, None] > neg[None, :]).float().mean().item()
    assert auc > 0.95


def test_classifier_works_in_a_pipeline_by_label_name(built: FixturePaths) -> None:
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(built.reward), top_k=None, function_to_apply="none")
    scores = [{s["label"]: s["score"] for s in out} for out in classify(["I loved it.", "I hated it."])]
    assert scores[0]["POSITIVE"] > 0 > scores[1]["POSITIVE"]
