"""Generation-based evaluation (phi3v_core.training.evaluate): decoding, left padding, metrics, JSON, sharding, PEFT."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from phi3v_core.config import get_config
from phi3v_core.data import PromptDataset, anls, load_task
from phi3v_core.errors import ConfigError, DataError
from phi3v_core.methods import MethodOptions, get_method
from phi3v_core.model import Phi3VForCausalLM
from phi3v_core.processing import Phi3VProcessor
from phi3v_core.training.evaluate import EvalResult, evaluate, evaluate_task, generate_answers, shard_indices

END_ID, PAD_ID = 32007, 32000


class ScriptedModel(nn.Module):
    """Stands in for Phi3VForCausalLM.generate: answers each prompt with a fixed string and records its inputs.

    Like ``generate`` it returns prompt + new tokens; a row that stops early (``<|end|>``) is padded with the pad id,
    as Hugging Face does for finished rows of a batch.
    """

    def __init__(self, processor: Phi3VProcessor, answers: dict[tuple[int, ...], str]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.tokenizer = processor.tokenizer
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kwargs: Any):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tuple(ids[mask.bool()].tolist())
            answer = self.tokenizer(self.answers[prompt], add_special_tokens=False)["input_ids"] + [END_ID]
            rows.append(answer[:max_new_tokens])
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows], dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


def distinct(task: Any) -> Any:
    """Make every eval prompt unique (twins may repeat a caption), so the scripted model can tell them apart."""
    for index, record in enumerate(task.eval):
        record.conversations[0].user += f" (#{index})"
    return task


def scripted(task: Any, processor: Phi3VProcessor, answers: list[str]) -> ScriptedModel:
    dataset = PromptDataset(task.eval_items(), processor)
    keys = [tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset))]
    assert len(set(keys)) == len(keys), "the scripted model needs distinct prompts"
    return ScriptedModel(processor, dict(zip(keys, answers)))


@pytest.fixture(scope="module")
def processor() -> Phi3VProcessor:
    return Phi3VProcessor.tiny(num_crops=1)


@pytest.fixture(scope="module")
def memes() -> Any:
    return distinct(load_task("hateful_memes", synthetic=2, synthetic_eval=5))


def tiny_model(seed: int = 0) -> Phi3VForCausalLM:
    """Random tiny model whose greedy choice stays inside the tiny tokenizer (399 ids), so answers are non-empty text.

    Rows of lm_head beyond the tokenizer (and the stop tokens) are zeroed, so their logits are 0 while the in-vocab
    maximum of ~400 random logits is positive: generation never stops early and always decodes to visible text.
    """
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(get_config("tiny", attn_implementation="sdpa")).eval()
    with torch.no_grad():
        model.lm_head.weight[399:] = 0
    return model


# ----------------------------------------------------------------------------------------------------------------


def test_scripted_answers_are_scored_in_item_order_and_written_like_the_recipe(tmp_path, processor, memes):
    items = memes.eval_items()
    refs = [item.references[0] for item in items]
    flipped = {"Yes": "No", "No": "Yes"}
    # 3 right (one with the recipe's tolerated case/period/space noise), 2 wrong.
    answers = [refs[0], f" {refs[1].lower()}.", refs[2], flipped[refs[3]], flipped[refs[4]]]
    model = scripted(memes, processor, answers)
    out = tmp_path / "eval" / "eval_after.json"

    result = evaluate_task(model, memes, processor, output_file=out, batch_size=2, progress=False)

    assert result.metric == "accuracy" and result.task == "hateful_memes"
    assert result.score == pytest.approx(3 / 5)
    assert result.predictions == [refs[0], f" {refs[1].lower()}.", refs[2], flipped[refs[3]], flipped[refs[4]]]
    assert result.ids == [item.id for item in items]
    assert len(model.calls) == 3  # 5 items in batches of 2
    written = json.loads(out.read_text())
    assert written["accuracy"] == pytest.approx(0.6)
    assert written["answers_unique"] == refs  # accuracy tasks: the answer string, as the recipe
    assert written["generated_texts_unique"] == result.predictions
    assert written["task"] == "hateful_memes" and written["num_samples"] == 5
    assert not list(out.parent.glob(".*tmp*")), "no temporary file left behind"
    assert EvalResult.from_json(out).predictions == result.predictions


def test_batches_are_left_padded_with_a_real_length_mask(processor, memes):
    model = scripted(memes, processor, ["x"] * 5)
    evaluate_task(model, memes, processor, batch_size=5, progress=False)
    call = model.calls[0]
    ids, mask = call["input_ids"], call["attention_mask"]
    lengths = mask.sum(dim=1)
    assert lengths.min() < lengths.max(), "the synthetic captions should give prompts of different lengths"
    assert bool(mask[:, -1].all()), "every prompt must end at the last column (left padding)"
    short = int(lengths.argmin())
    assert mask[short, 0] == 0 and ids[short, 0] == PAD_ID
    assert call["do_sample"] is False and call["use_cache"] is True and call["pad_token_id"] == PAD_ID
    assert "pixel_values" in call and len(call["image_sizes"]) == 5


def test_docvqa_uses_anls_and_keeps_every_reference(tmp_path, processor):
    task = distinct(load_task("docvqa", synthetic=1, synthetic_eval=3))
    refs = [item.references for item in task.eval_items()]
    answers = [refs[0][0], refs[1][0][:-1], "zzzzzzzz"]  # exact, one character short, far off
    model = scripted(task, processor, answers)
    result = evaluate_task(model, task, processor, output_file=tmp_path / "e.json", progress=False)
    expected = anls(answers, refs)
    assert result.metric == "anls"
    assert result.score == pytest.approx(expected)
    assert 1 / 3 < result.score < 2 / 3  # 1 + (1 - 1/len) + 0, over 3
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["anls"] == pytest.approx(expected) and "accuracy" not in written
    assert written["answers_unique"] == refs  # lists of accepted answers, as the recipe


def test_generation_stops_at_max_new_tokens(processor, memes):
    model = scripted(memes, processor, ["a long answer that goes on"] * 5)
    result = evaluate_task(model, memes, processor, max_new_tokens=3, progress=False)
    assert all(0 < len(answer) <= 3 for answer in result.predictions)


def test_real_tiny_model_batched_equals_one_by_one_and_restores_train_mode(processor, memes):
    model = tiny_model()
    model.train()
    dataset = PromptDataset(memes.eval_items()[:3], processor)
    batched = generate_answers(model, dataset, processor, batch_size=3, max_new_tokens=3)
    single = generate_answers(model, dataset, processor, batch_size=1, max_new_tokens=3)
    assert batched == single
    assert all(answer.strip() for answer in batched), batched
    assert model.training, "evaluation must hand the model back in the mode it got it"


def test_peft_wrapped_model_generates_with_its_adapters(processor, memes):
    items = memes.eval_items()[:2]
    model = tiny_model()
    base = evaluate(model, items, processor, metric="accuracy", max_new_tokens=4, progress=False).predictions
    peft_model, report = get_method("lora").prepare(model, MethodOptions(lora_rank=4, base_dtype=torch.float32))
    assert type(peft_model).__name__.startswith("PeftModel")
    at_init = evaluate(peft_model, items, processor, metric="accuracy", max_new_tokens=4, progress=False).predictions
    assert at_init == base  # LoRA B starts at zero: same function
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
    trained = evaluate(peft_model, items, processor, metric="accuracy", max_new_tokens=4, progress=False).predictions
    assert trained != base, "generate() must go through the adapters"


def test_bad_inputs_fail_clearly(processor, memes):
    model = scripted(memes, processor, ["x"] * 5)
    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate(model, [], processor, metric="accuracy", task="memes", progress=False)
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        evaluate(model, memes.eval_items(), processor, metric="bleu", progress=False)
    with pytest.raises(DataError, match="not an evaluation result"):
        bad = Path(os.devnull)
        EvalResult.from_json(bad)


@pytest.mark.parametrize(
    ("n", "world", "expected"),
    [(5, 1, [[0, 1, 2, 3, 4]]), (5, 2, [[0, 2, 4], [1, 3]]), (2, 3, [[0], [1], []])],
)
def test_shards_are_strided_disjoint_and_complete(n, world, expected):
    shards = [shard_indices(n, rank, world) for rank in range(world)]
    assert shards == expected
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    with pytest.raises(ValueError):
        shard_indices(n, world, world)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        processor = Phi3VProcessor.tiny(num_crops=1)
        task = distinct(load_task("hateful_memes", synthetic=2, synthetic_eval=5))
        answers = [item.references[0] if i % 2 == 0 else "wrong" for i, item in enumerate(task.eval_items())]
        model = scripted(task, processor, answers)
        # Only rank 0 may write: rank 1 gets its own path, which must stay absent.
        result = evaluate_task(
            model, task, processor, output_file=Path(out_dir) / f"rank{rank}.json", batch_size=2, progress=False
        )
        prompts = sum(int(call["input_ids"].shape[0]) for call in model.calls)
        summary = {"score": result.score, "predictions": result.predictions, "ids": result.ids, "prompts": prompts}
        (Path(out_dir) / f"summary{rank}.json").write_text(json.dumps(summary))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_work_gather_in_order_and_only_rank0_writes(tmp_path):
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    s0 = json.loads((tmp_path / "summary0.json").read_text())
    s1 = json.loads((tmp_path / "summary1.json").read_text())
    assert (s0["prompts"], s1["prompts"]) == (3, 2)  # items 0,2,4 and 1,3
    assert s0["predictions"] == s1["predictions"] and s0["ids"] == s1["ids"]
    assert s0["predictions"][1] == "wrong" and s0["predictions"][3] == "wrong"
    assert s0["score"] == pytest.approx(3 / 5)
    assert json.loads((tmp_path / "rank0.json").read_text())["num_samples"] == 5
    assert not (tmp_path / "rank1.json").exists()
