"""PEFT-format adapters in and out, and the Python API (docs/adapters.md).

Adapters are trained here by plain ``peft`` scripts (transformers + peft + torch, no uqlora code) on the tiny
random models saved as ordinary transformers folders; uqlora must import them to plain peft's logits, run its
post-hoc methods on them, export its own adapters so that plain peft reproduces its logits, and refuse an
adapter of another base model or other target modules in one line.
"""
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from conftest import ROOT, compose
from uqlora import AdUE, Laplace, Temperature, load_backbone, load_data, to_batch
from uqlora.errors import UqloraError
from uqlora.methods import METHODS, discover
from uqlora.rundir import RunDir
from uqlora.tasks import evaluate_run, train

discover()
FAST = ["debug=fast", "logger=none", "progress_bar=none", "print_table=false", "data.max_train_samples=32",
        "data.max_val_samples=16", "data.max_calib_samples=16", "data.max_test_samples=16", "data.batch_size=8"]
TEXTS = ["a gripping, beautiful film", "dull and far too long", "I loved every minute", "a waste of two hours",
         "the cast is wonderful", "flat jokes, flat story", "moving and funny", "nothing works here"]


# --- the base models as plain transformers folders, and plain-peft training scripts ---------------------
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """tiny_llama and tiny_bert saved with save_pretrained (the folder name is the model name, so the adapters'
    base_model_name_or_path identifies the model)."""
    from uqlora.models.loading import load_pretrained

    out = {}
    for name in ("tiny_llama", "tiny_bert"):
        model, tok = load_pretrained(compose([f"model={name}"]).model)
        folder = tmp_path_factory.mktemp("bases") / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


def peft_train(model, tok, out, targets, task_type, steps=4, labels=None, r=8, alpha=16):
    """A plain peft fine-tuning script: LoRA on ``targets``, a few AdamW steps, save_pretrained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                          task_type=task_type))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    for _ in range(steps):
        if labels is None:
            y = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = pm(**enc, labels=y).loss
        else:
            loss = pm(**enc, labels=torch.tensor(labels)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(out)
    return pm.eval()


@pytest.fixture(scope="module")
def causal_adapter(bases, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bases["tiny_llama"])
    tok.pad_token = tok.pad_token or tok.eos_token
    out = tmp_path_factory.mktemp("adapters") / "causal"
    pm = peft_train(AutoModelForCausalLM.from_pretrained(bases["tiny_llama"]), tok, out, ["q_proj", "v_proj"],
                    "CAUSAL_LM")
    return out, pm


def seq_cls_adapter(base, out, targets, pad=False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    if pad:
        model.config.pad_token_id = tok.pad_token_id
    return peft_train(model, tok, out, targets, "SEQ_CLS", labels=[1, 0, 1, 0, 1, 0, 1, 0])


def _batch(bb, data_split="test", n=8):
    splits = load_data(bb, max_test_samples=n, max_train_samples=16)
    return bb.collator(splits[data_split][:n])


def _separate_batch(bb, data, adapter=None, overrides=()):
    """The same test examples as :func:`_batch` in the one-sequence-per-choice cloze layout (what plain
    transformers scores)."""
    sep = load_backbone("tiny_llama", data=data, adapter=adapter, overrides=[*overrides, "model.cloze_impl=separate"])
    return _batch(sep)


# --- import -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,head", [("sst2", "lm_choices"), ("arc_e", "lm_cloze")])
def test_plain_peft_causal_adapter_gives_plain_peft_logits(causal_adapter, data, head):
    folder, pm = causal_adapter
    bb = load_backbone("tiny_llama", data=data, adapter=folder).eval()
    assert bb.head_kind == head
    batch = _batch(bb)  # ours: the default (packed) cloze layout; plain peft scores one sequence per choice
    if head == "lm_cloze":
        batch_ours = batch
        batch = _separate_batch(bb, "arc_e", folder)
    with torch.no_grad():
        ours = bb.logits(batch if head != "lm_cloze" else batch_ours)
        full = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if head == "lm_choices":
        last = batch["attention_mask"].sum(1) - 1
        theirs = full[torch.arange(len(last)), last][:, bb.answer_token_ids]
    else:  # each choice's continuation log-likelihood / its length in characters
        logp = full.log_softmax(-1)
        tgt = batch["target_mask"].bool()
        tgt[:, 0] = False
        rows, cols = tgt.nonzero(as_tuple=True)
        tok_lp = logp[rows, cols - 1].gather(1, batch["input_ids"][rows, cols].unsqueeze(1)).squeeze(1)
        scores = torch.zeros(len(tgt)).index_add_(0, rows, tok_lp) / batch["cont_chars"].float()
        theirs = scores.view(len(batch["labels"]), -1).masked_fill(~batch["choice_mask"].bool(), -1e9)
    assert not torch.equal(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight,
                           torch.zeros_like(pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model,pooling,targets", [("tiny_bert", "pooler", ["query", "value"]),
                                                   ("tiny_llama", "last", ["q_proj", "v_proj"])])
def test_plain_peft_classifier_adapter_gives_plain_peft_logits(bases, tmp_path, model, pooling, targets):
    """BertForSequenceClassification's classifier (on the pooler) and LlamaForSequenceClassification's score (last
    token, no bias), saved by peft as modules_to_save, are our classifier head."""
    pm = seq_cls_adapter(bases[model], tmp_path / "a", targets, pad=model == "tiny_llama")
    bb = load_backbone(model, data="sst2", adapter=tmp_path / "a", head="classifier",
                       overrides=[f"model.pooling={pooling}"]).eval()
    batch = _batch(bb)
    with torch.no_grad():
        ours = bb.logits(batch)
        theirs = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    other = "cls" if model == "tiny_bert" else "mean"
    with pytest.raises(UqloraError, match=f"add model.pooling={pooling}") as e:
        load_backbone(model, data="sst2", adapter=tmp_path / "a", head="classifier", overrides=[f"model.pooling={other}"])
    assert "\n" not in str(e.value)


def test_a_classifier_head_without_weights_says_how_to_provide_one(causal_adapter):
    with pytest.raises(UqloraError, match="has no classification head.*uqlora_head.safetensors.*lm_choices") as e:
        load_backbone("tiny_llama", data="sst2", adapter=causal_adapter[0], head="classifier",
                      overrides=["model.pooling=last"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["laplace", "temperature", "adue"] + (["tfb"] if "tfb" in METHODS else []))
def test_posthoc_methods_run_on_a_plain_peft_adapter(causal_adapter, tmp_path, name):
    from uqlora.models.peft_io import read_adapter

    extra = {"laplace": ["method.prior.steps=5"],
             "adue": ["method.grid.lr=[1e-3]", "method.grid.alpha_reg=[0.1]", "method.grid.alpha_l2sp=[0.1]",
                      "method.epochs=2"],
             "tfb": ["method.num_samples=2", "method.search_iters=2", "method.anchor_size=16"]}.get(name, [])
    cfg = compose([*FAST, "model=tiny_llama", "data=sst2", f"method={name}", f"method.adapter={causal_adapter[0]}",
                   *extra])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    metrics, objs = train(cfg)
    res = objs["results"]
    assert res["status"] == "complete" and res["train"]["adapter"] == str(causal_adapter[0])
    assert len(res["train"]["adapter_sha256"]) == 64
    assert "fit" not in res["timings"]  # no training
    assert np.isfinite(metrics["test"]["nll"])
    saved = RunDir(objs["run_dir"]).adapter()
    theirs = read_adapter(causal_adapter[0]).tensors
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    torch.testing.assert_close(saved["transformer.base_model.model.layers.1.self_attn.v_proj.lora_B.default.weight"],
                               theirs[key])


# --- export -------------------------------------------------------------------------------------------------
def _trained_run(tmp_path, *overrides, lr=0.05, steps=3):
    cfg = compose([*FAST, "method=map", f"trainer.max_steps={steps}", f"optim.lr={lr}", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    _, objs = train(cfg)
    (objs["run_dir"] / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, objs["run_dir"] / ".hydra" / "config.yaml")
    return RunDir(objs["run_dir"])


def _ours(model, data, run: RunDir, head="auto", overrides=()):
    bb = load_backbone(model, data=data, head=head, overrides=overrides)
    bb.load_trainable_state_dict(run.adapter())
    return bb.eval()


@pytest.mark.parametrize("model,data,head,pooling,load_with", [
    ("tiny_llama", "sst2", "lm_choices", "last", "AutoModelForCausalLM"),
    ("tiny_llama", "arc_e", "lm_cloze", "last", "AutoModelForCausalLM"),
    ("tiny_bert", "sst2", "classifier", "pooler", "AutoModelForSequenceClassification"),
    ("tiny_bert", "sst2", "classifier", "cls", "AutoModel"),
])
def test_exported_adapter_reimports_and_loads_in_plain_peft(bases, tmp_path, model, data, head, pooling, load_with):
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    over = [f"model.pooling={pooling}"]
    run = _trained_run(tmp_path, f"model={model}", f"data={data}", *over)
    meta = json.loads((run.adapter_dir / "uqlora_adapter.json").read_text())
    assert meta["load_with"] == load_with and meta["head"] == head
    ours = _ours(model, data, run, overrides=over)
    batch = _batch(ours)
    with torch.no_grad():
        expected = ours.logits(batch)
        # re-imported through the pipeline's importer: identical logits
        again = load_backbone(model, data=data, adapter=run.adapter_dir, overrides=over).eval().logits(batch)
        torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)
        if head == "lm_cloze":  # plain peft scores one sequence per choice
            batch = _separate_batch(ours, data, overrides=over)
        # plain transformers + peft
        kw = {"num_labels": 2} if load_with == "AutoModelForSequenceClassification" else {}
        base = getattr(transformers, load_with).from_pretrained(bases[model], **kw)
        pm = PeftModel.from_pretrained(base, run.adapter_dir).eval()
        out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        head_file = run.adapter_dir / "uqlora_head.safetensors"
        extra = load_file(head_file) if head_file.is_file() else {}
        last = batch["attention_mask"].sum(1) - 1
        if head == "lm_choices":  # the documented recipe: last token's hidden state x the trained answer rows
            h = out.hidden_states[-1][torch.arange(len(last)), last]
            theirs = h @ extra["answer_rows"].T
            assert extra["answer_token_ids"].tolist() == ours.answer_token_ids.tolist()
        elif head == "lm_cloze":
            logp = out.logits.float().log_softmax(-1)
            tgt = batch["target_mask"].bool()
            tgt[:, 0] = False
            rows, cols = tgt.nonzero(as_tuple=True)
            lp = logp[rows, cols - 1].gather(1, batch["input_ids"][rows, cols].unsqueeze(1)).squeeze(1)
            theirs = torch.zeros(len(tgt)).index_add_(0, rows, lp) / batch["cont_chars"].float()
            theirs = theirs.view(len(batch["labels"]), -1)
            theirs = theirs.masked_fill(~batch["choice_mask"].bool(), -1e9)
        elif load_with == "AutoModel":
            theirs = out.last_hidden_state[:, 0] @ extra["head.weight"].T + extra["head.bias"]
        else:
            theirs = out.logits
    torch.testing.assert_close(theirs.float(), expected, rtol=0, atol=1e-5)


def test_eval_export_writes_an_old_runs_adapter(tmp_path):
    run = _trained_run(tmp_path, "model=tiny_llama", "data=sst2")
    ecfg = compose([f"run_dir={run.path}", f"export={tmp_path / 'exported'}"], config_name="eval")
    evaluate_run(ecfg)
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "uqlora_head.safetensors"):
        a, b = load_file(run.adapter_dir / name), load_file(tmp_path / "exported" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny_llama"


def test_init_adapter_continues_training_from_it(causal_adapter, tmp_path):
    from uqlora.models.peft_io import read_adapter

    run = _trained_run(tmp_path, "model=tiny_llama", "data=sst2", f"train.init_adapter={causal_adapter[0]}",
                       lr=1e-9, steps=1)
    assert (run.results() or {})["train"]["init_adapter"] == str(causal_adapter[0])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    start = read_adapter(causal_adapter[0]).tensors[key]
    after = run.adapter()["transformer.base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert start.abs().max() > 1e-3 and torch.allclose(after, start, atol=1e-6)


# --- refusals -------------------------------------------------------------------------------------------------
def _edited(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_another_base_model_or_target_modules_fail_in_one_line(bases, causal_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other_base = _edited(causal_adapter[0], tmp_path / "other_base", base_model_name_or_path="HuggingFaceTB/SmolLM2-360M")
    tok = AutoTokenizer.from_pretrained(bases["tiny_llama"])
    tok.pad_token = tok.pad_token or tok.eos_token
    peft_train(AutoModelForCausalLM.from_pretrained(bases["tiny_llama"]), tok, tmp_path / "qkv",
               ["q_proj", "k_proj", "v_proj"], "CAUSAL_LM", steps=1)
    wrong_r = _edited(causal_adapter[0], tmp_path / "r16", r=16, lora_alpha=32)
    cases = [(other_base, r"base model 'HuggingFaceTB/SmolLM2-360M' with LoRA on \['q_proj', 'v_proj'\]; this run's "
                          r"model 'tiny_llama' is 'tiny_llama' with model.lora.target_modules=\['q_proj', 'v_proj'\]"),
             (tmp_path / "qkv", r"with LoRA on \['k_proj', 'q_proj', 'v_proj'\]; .*target_modules=\['q_proj', 'v_proj'\]"),
             (wrong_r, r"has r=16, lora_alpha=32; .*add model.lora.r=16 model.lora.alpha=32"),
             (tmp_path / "nowhere" / "x", r"does not exist"),
             ("nobody-xyz/not-an-adapter", r"the hub is offline \(HF_HUB_OFFLINE=1\)")]
    for folder, msg in cases:
        cfg = compose([*FAST, "model=tiny_llama", "method=laplace", f"method.adapter={folder}"])
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path / "run")
        with pytest.raises(UqloraError, match=msg) as e:
            train(cfg)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "run" / "results.json").exists()  # refused before the run started
    # an adapter of another architecture (tiny_bert's LoRA) for tiny_llama: the modules do not map
    pm = seq_cls_adapter(bases["tiny_bert"], tmp_path / "bert", ["query", "value"])
    assert pm is not None
    with pytest.raises(UqloraError, match=r"tiny_bert' with LoRA on \['query', 'value'\]; this run's model 'tiny_llama' is "
                                          r"'tiny_llama' with model.lora.target_modules=\['q_proj', 'v_proj'\]") as e:
        load_backbone("tiny_llama", data="sst2", adapter=tmp_path / "bert")
    assert "\n" not in str(e.value)


def test_method_adapter_and_map_run_together_are_refused(causal_adapter):
    from uqlora.validate import validate_config

    cfg = compose([*FAST, "method=laplace", f"method.adapter={causal_adapter[0]}", "method.map_run=/some/run"])
    with pytest.raises(UqloraError, match="method.map_run and method.adapter are set together"):
        validate_config(cfg)


# --- the Python API ---------------------------------------------------------------------------------------------
def test_api_fits_on_dataloaders_saves_and_loads(causal_adapter, tmp_path):
    bb = load_backbone("tiny_llama", data="sst2", adapter=causal_adapter[0])
    splits = load_data(bb, max_train_samples=24, max_val_samples=16, max_calib_samples=16, max_test_samples=16)
    dl = lambda s: DataLoader(splits[s], batch_size=8, collate_fn=bb.collator)  # noqa: E731
    post = Laplace(bb, prior="marglik", n_kfac=4).fit(dl("train"))
    assert post.cfg.method.prior.method == "marglik" and post.cfg.method.prior.steps == 300
    batch = next(iter(dl("test")))
    probs = post.predict(batch)
    assert probs.shape == (8, 2) and torch.allclose(probs.sum(1), torch.ones(8))
    post.save(tmp_path / "lap")
    again = Laplace.load(tmp_path / "lap", bb)
    torch.testing.assert_close(again.predict(batch), probs, rtol=0, atol=1e-6)
    assert (tmp_path / "lap" / "adapter" / "adapter_config.json").is_file()
    # an HF-tokenised DataLoader of the same prompts gives the same predictive
    texts = [f"Review: {r['text']}\nSentiment:" for r in splits["test"][:8]]  # conf/data/sst2.yaml's prompt
    enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    hf = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
          "label": torch.tensor([r["label"] for r in splits["test"][:8]])}
    torch.testing.assert_close(post.predict(hf), probs, rtol=0, atol=1e-6)
    texts = to_batch(bb, [r["text"] for r in splits["test"][:8]], [r["label"] for r in splits["test"][:8]])
    assert torch.equal(texts["input_ids"], batch["input_ids"]) and torch.equal(texts["labels"], batch["labels"])
    T = Temperature(bb, base=post).fit(dl("calib"))
    assert T.method.temperature > 0 and T.predict(batch).shape == (8, 2)
    a = AdUE(bb, grid={"lr": [1e-3], "alpha_reg": [0.1], "alpha_l2sp": [0.1]}, epochs=1).fit(dl("train"), val=dl("val"))
    out = a.predict_loader(dl("test"))
    assert out["probs"].shape == (16, 2) and out["u_adue"].shape == (16,)
    # the options are the schema's: a bad key, value or range is one line
    for kw, msg in [({"prior": "margli"}, "unknown method.prior.method 'margli'; valid choices: marglik"),
                    ({"n_kfac": 0}, "method.n_kfac=0 is impossible"), ({"nope": 1}, "Key 'nope' not in")]:
        with pytest.raises(UqloraError, match=msg):
            Laplace(bb, **kw)
    with pytest.raises(UqloraError, match="needs the 'val' split: pass fit"):
        AdUE(bb).fit(dl("train"))
    left = dict(hf, attention_mask=enc["attention_mask"].flip(1))
    with pytest.raises(UqloraError, match="left-padded"):
        post.predict(left)


def test_api_trains_swag_with_the_pipelines_trainer(tmp_path):
    from uqlora import SWAG

    bb = load_backbone("tiny_llama", data="sst2")
    splits = load_data(bb, max_train_samples=24, max_val_samples=8, max_test_samples=8)
    dl = lambda s: DataLoader(splits[s], batch_size=8, collate_fn=bb.collator)  # noqa: E731
    before = {k: v.clone() for k, v in bb.trainable_state_dict().items()}
    s = SWAG(bb, collect_every=1, num_samples=3, max_rank=2, trainer={"max_steps": 6, "val_check_interval": 3},
             optim={"lr": 0.01}).fit(dl("train"), val=dl("val"), workdir=tmp_path / "swag")
    assert any(not torch.equal(before[k], v) for k, v in bb.trainable_state_dict().items())
    out = s.predict_loader(dl("test"))
    assert out["samples"].shape == (3, 8, 2)
    assert (tmp_path / "swag" / "adapter" / "adapter_model.safetensors").is_file()


# --- the notebook -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny_llama", "smollm2_135m"])
def test_api_quickstart_notebook_runs(tmp_path, model):
    import ipykernel  # noqa: F401
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "api_quickstart.ipynb", as_version=4)
    env = {"UQLORA_NB_MODEL": model, "UQLORA_NB_OUT": str(tmp_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "plain peft reproduces our logits: True" in text
    assert "reloaded Laplace predicts the same: True" in text
