"""Preventative steering and ablation hooks for HF training (fast: a tiny random Llama in HF only)."""

from __future__ import annotations

import pytest
import torch

from personavec_vllm.training import ablation, decoder_layers, preventative_steering, steering_terms, unwrap_model
from personavec_vllm.vectors import PersonaVector

LAYER = 2  # residual stream after decoder layer 1


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def ids(hf):
    _, tok = hf
    return torch.tensor([tok("How should I treat my neighbours? Kindly.", add_special_tokens=False)["input_ids"]])


def _vector(model, seed=0, norm=0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size, generator=gen)
    return v / v.norm(dim=1, keepdim=True) * norm


def _layer_output(model, ids, index):
    """Output of decoder layer `index` (captured by a hook registered now, i.e. after any others)."""
    seen = {}
    handle = decoder_layers(model)[index].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.clone()))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        handle.remove()
    return seen["h"], logits


def _no_hooks(model):
    return all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in decoder_layers(model))


def test_steering_adds_exactly_the_term_and_is_removed(hf, ids):
    model, _ = hf
    v = _vector(model)
    coeff = 3.0
    before_h, before_logits = _layer_output(model, ids, LAYER - 1)

    with preventative_steering(model, v, coeff, layers=[LAYER]) as terms:
        assert list(terms) == [LAYER]
        steered_h, steered_logits = _layer_output(model, ids, LAYER - 1)
        other_h, _ = _layer_output(model, ids, LAYER - 2)  # the layer before is untouched
    # The layer's output is exactly the unsteered output plus coeff * v[LAYER], at every position.
    assert torch.equal(steered_h, before_h + coeff * v[LAYER])
    assert torch.equal(other_h, _layer_output(model, ids, LAYER - 2)[0])

    # Manual computation of the whole forward pass: add the term to the next layer's input instead.
    def pre_hook(module, args):  # LlamaModel passes hidden_states positionally
        return (args[0] + coeff * v[LAYER], *args[1:])

    handle = decoder_layers(model)[LAYER].register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            manual_logits = model(ids).logits
    finally:
        handle.remove()
    assert torch.equal(steered_logits, manual_logits)
    assert not torch.equal(steered_logits, before_logits)

    # After exit: no hooks left, outputs bit-identical to before.
    assert _no_hooks(model)
    after_h, after_logits = _layer_output(model, ids, LAYER - 1)
    assert torch.equal(after_h, before_h) and torch.equal(after_logits, before_logits)


def test_hooks_removed_on_exception(hf, ids):
    model, _ = hf
    _, before = _layer_output(model, ids, 0)
    with pytest.raises(RuntimeError, match="boom"), preventative_steering(model, _vector(model), 5.0, layers="all"):
        assert not _no_hooks(model)
        raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(KeyError), ablation(model, _vector(model), layers=[1, 3]):
        raise KeyError("x")
    assert _no_hooks(model)
    assert torch.equal(_layer_output(model, ids, 0)[1], before)


def test_terms_add_up_and_default_to_recommended_layer(hf):
    model, _ = hf
    a, b = _vector(model, 1), _vector(model, 2)
    pv = PersonaVector(name="a", vectors=a, trait="a", model="tiny", layer=3)
    terms = steering_terms(model, [pv, b], [2.0, -1.0], layers=[3])
    assert torch.allclose(terms[3], 2.0 * a[3] - 1.0 * b[3])
    assert list(steering_terms(model, pv, 1.0)) == [3]  # the vector's recommended layer
    with pytest.raises(ValueError, match="layers are required"):
        steering_terms(model, b, 1.0)
    with pytest.raises(ValueError, match="out of range"):
        steering_terms(model, b, 1.0, layers=[0])
    with pytest.raises(ValueError, match="shape"):
        steering_terms(model, torch.zeros(3, model.config.hidden_size), 1.0, layers=[1])


def test_ablation_projects_the_direction_out(hf, ids):
    model, _ = hf
    v = _vector(model, 3)
    before_h, before_logits = _layer_output(model, ids, LAYER - 1)
    with ablation(model, v, layers=[LAYER]):
        h, _ = _layer_output(model, ids, LAYER - 1)
    u = v[LAYER] / v[LAYER].norm()
    assert (h @ u).abs().max() < 1e-5
    assert torch.allclose(h, before_h - (before_h @ u).unsqueeze(-1) * u, atol=1e-6)
    assert torch.equal(_layer_output(model, ids, LAYER - 1)[1], before_logits)


def test_peft_lora_model_trains_under_steering(tiny_llama, ids):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    assert unwrap_model(lora) is model
    assert decoder_layers(lora) is model.model.layers
    v = _vector(model)
    lora.eval()
    with torch.no_grad():
        before = lora(ids).logits
    with preventative_steering(lora, v, 4.0, layers=[LAYER]):
        out = lora(ids, labels=ids)
        out.loss.backward()
        assert not torch.equal(out.logits.detach(), before)
    grads = [p.grad for n, p in lora.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert _no_hooks(lora)
    with torch.no_grad():
        assert torch.equal(lora(ids).logits, before)


def test_trainer_runs_inside_the_context(tiny_llama, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    data = [{"input_ids": list(range(10, 26)), "labels": list(range(10, 26))} for _ in range(4)]
    seen = []
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    with preventative_steering(trainer.model, _vector(model), 2.0, layers=[LAYER]):
        hook = decoder_layers(model)[LAYER - 1].register_forward_hook(lambda m, a, o: seen.append(1))
        trainer.train()
        hook.remove()
    assert len(seen) == 2 and _no_hooks(model)
