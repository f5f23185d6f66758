"""The three heads against brute force on tiny random models (float64), and the adapter state."""
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from conftest import compose
from uqlora.data.prompts import Collator
from uqlora.errors import UqloraError
from uqlora.methods.base import smoothed_cross_entropy
from uqlora.models.backbone import build_backbone
from uqlora.models.loading import load_pretrained

MC = [
    {"id": "q1", "question": "What is the colour of the sky on a clear day?", "choices": ["blue", "green", "a red fox"],
     "label": 0, "choice_labels": ["A", "B", "C"]},
    {"id": "q2", "question": "Two plus two?", "choices": ["four", "five", "six", "seven"], "label": 0,
     "choice_labels": ["A", "B", "C", "D"]},
]
CLS = [{"id": "a", "text": "a truly wonderful film", "text_pair": None, "label": 1},
       {"id": "b", "text": "dull", "text_pair": None, "label": 0}]


def _bb(model_name, head, C, words=None):
    mcfg = compose([f"model={model_name}"]).model
    model, tok = load_pretrained(mcfg)
    bb = build_backbone(mcfg, head, C, answer_words=words, tokenizer=tok, model=model).double().eval()
    return bb, tok, model


def test_cloze_scores_equal_brute_force_loglik():
    bb, tok, _ = _bb("tiny_llama", "lm_cloze", 4)
    bb.norm = "none"
    col = Collator(tok, "lm_cloze", "multiple_choice", 4, 64)
    batch = col(MC)
    with torch.no_grad():
        logits = bb.logits(batch)
    assert logits.shape == (2, 4)
    assert logits[0, 3] < -1e8  # padded choice masked
    for b, rec in enumerate(MC):
        for c, choice in enumerate(rec["choices"]):
            ctx = tok(f"Question: {rec['question']}\nAnswer:")["input_ids"]
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                h = bb.transformer(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
                lp = F.log_softmax(bb.lm_head(h), -1)[0]
            expect = sum(lp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
            assert logits[b, c].item() == pytest.approx(expect, rel=1e-6)  # heads return float32 logits


def test_cloze_normalisations():
    bb, tok, _ = _bb("tiny_llama", "lm_cloze", 4)
    batch = Collator(tok, "lm_cloze", "multiple_choice", 4, 64)(MC)
    with torch.no_grad():
        bb.norm = "none"
        raw = bb.logits(batch)
        bb.norm = "char"
        per_char = bb.logits(batch)
    chars = torch.tensor([len(" " + c) for c in MC[0]["choices"]], dtype=torch.float64)
    assert torch.allclose(per_char[0, :3].double(), raw[0, :3].double() / chars, rtol=1e-6)


def test_lm_choices_equal_full_lm_logits_at_answer_position():
    words = [" negative", " positive"]
    bb, tok, model = _bb("tiny_llama", "lm_choices", 2, words)
    col = Collator(tok, "lm_choices", "classification", 2, 64, {"template": "Review: {text}\nSentiment:"})
    batch = col(CLS)
    with torch.no_grad():
        logits = bb.logits(batch)
        for b, rec in enumerate(CLS):
            ids = tok(f"Review: {rec['text']}\nSentiment:", return_tensors="pt")["input_ids"]
            full = model.double()(input_ids=ids).logits[0, -1]  # LoRA B = 0 at init: same as the base model
            wid = [tok.encode(w, add_special_tokens=False)[0] for w in words]
            assert torch.allclose(logits[b].double(), full[wid], atol=1e-6)


def test_lm_choices_letters_masked_for_missing_choices():
    bb, tok, _ = _bb("tiny_llama", "lm_choices", 4, [" A", " B", " C", " D"])
    batch = Collator(tok, "lm_choices", "multiple_choice", 4, 64)(MC)
    with torch.no_grad():
        p = bb.logits(batch).softmax(-1)
    assert p[0, 3] == 0 and p[1, 3] > 0
    assert torch.allclose(p.sum(-1), torch.ones(2, dtype=p.dtype))


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_classifier_pooling_ignores_padding(pooling):
    bb, tok, _ = _bb("tiny_bert", "classifier", 2)
    bb.pooling = pooling
    col = Collator(tok, "classifier", "classification", 2, 64, causal=False)
    with torch.no_grad():
        both = bb.logits(col(CLS))
        alone = bb.logits(col(CLS[1:]))
    assert torch.allclose(both[1], alone[0], atol=1e-6)


def test_trainable_state_roundtrip_and_mismatch():
    bb, _, _ = _bb("tiny_bert", "classifier", 2)
    state = bb.trainable_state_dict()
    assert state and all("lora_" in k or k.startswith("head.") for k in state)
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.add_(1.0)
    bb.load_trainable_state_dict(state)
    assert all(torch.equal(bb.trainable_state_dict()[k], v) for k, v in state.items())
    other, _, _ = _bb("tiny_bert", "classifier", 3)
    with pytest.raises(UqloraError, match="different model"):
        other.load_trainable_state_dict(state)


def test_only_lora_and_head_train():
    bb, _, _ = _bb("tiny_llama", "lm_choices", 2, [" no", " yes"])
    names = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("answer_") for n in names)
    assert any(n.startswith("answer_rows") for n in names)


def test_bad_lora_target_lists_valid_modules():
    mcfg = compose(["model=tiny_bert", "model.lora.target_modules=[nosuch]"]).model
    model, tok = load_pretrained(mcfg)
    with pytest.raises(UqloraError, match="nosuch.*query"):
        build_backbone(mcfg, "classifier", 2, model=model, tokenizer=tok)


def test_smoothed_ce_matches_torch_and_masks_padding():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    for eps in (0.0, 0.1, 0.3):
        ours = smoothed_cross_entropy(logits, labels, eps)
        ref = F.cross_entropy(logits, labels, label_smoothing=eps)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 0]] * 6, dtype=torch.bool)
    masked = logits.masked_fill(~mask, -1e9)
    ours = smoothed_cross_entropy(masked, labels.clamp(max=2), 0.2, mask)
    ref = F.cross_entropy(logits[:, :3], labels.clamp(max=2), label_smoothing=0.2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
