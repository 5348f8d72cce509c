"""A scripted multi-turn kit for the runner and module tests: a tiny policy with a tool-rendering ChatML
template, four questions, and an engine that writes each row's scripted turns (a good call, a call
with a wrong argument, no call, a malformed call)."""

import json

import torch

from lit_rlhf.models import Actor, load_tokenizer
from lit_rlhf.models.policy_set import PolicySet
from lit_rlhf.rewards import RewardFunction
from lit_rlhf.rewards.scorer import RewardScorer
from lit_rlhf.rollout import RolloutEngine, Sample
from lit_rlhf.rollout.kl_control import KLController
from lit_rlhf.rollout.runner import RolloutRunner
from lit_rlhf.settings import AlgorithmSettings, GenerationSettings, KLSettings, LoadSettings, RolloutSettings
from lit_rlhf.tasks import chat_tokenizer, save_tiny_models, tiny_llama_config


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers.

    Args:
        expression: the expression, e.g. "123 * 45".
    """
    if not set(expression) <= set("0123456789+-*/ ()"):
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(eval(expression))


def call(name, **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


QUESTIONS = ["What is 123*45?", "What is 7*8?", "What is 9*9?", "What is 2*3?"]
ANSWERS = ["5535", "56", "81", "6"]
# per row, per turn: what the scripted policy writes (each turn ends with <|im_end|>)
SCRIPT = [
    [call("calculator", expression="123*45"), "5535"],  # a good call, then the answer
    [call("calculator", expr="7*8"), "56"],  # wrong argument name: an error it can read
    ["81"],  # no call: answers at once
    ['<tool_call>{"name": calculator}</tool_call>', "6"],  # malformed
]


class ScriptedEngine(RolloutEngine):
    """Returns the script's ids for each row's next turn (the row is found by its prompt)."""

    recomputes_old_log_probs = True

    def __init__(self, tok):
        self.tok, self.calls = tok, []
        self.eos = tok.convert_tokens_to_ids("<|im_end|>")

    def start(self, actor, device):
        return True

    def sync_weights(self, actor):
        pass

    def generate(self, requests, generation, on_token=None):
        self.calls.append(len(requests))
        out = []
        for request in requests:
            text = self.tok.decode(list(request.prompt_ids))
            row = next(i for i, q in enumerate(QUESTIONS) if q.lower() in text.lower())
            turn = text.count("<|im_start|>assistant") - 1
            ids = self.tok(SCRIPT[row][turn], add_special_tokens=False)["input_ids"] + [self.eos]
            out.append(Sample(tuple(ids), tuple([-0.5] * len(ids)), "stop"))
        return out


def make_kit(tmp_path_factory):
    corpus = [q + " " + s for q, turns in zip(QUESTIONS, SCRIPT, strict=True) for s in turns] * 40
    corpus += ["tool_response system Tools functions signatures error wrong arguments raised"] * 20
    tok = chat_tokenizer("qwen_tools", corpus)
    config = tiny_llama_config(tok, hidden_size=32, num_layers=1, num_heads=4)
    paths = save_tiny_models(str(tmp_path_factory.mktemp("tools")), tok, config, seed=0)
    return load_tokenizer(paths["policy"]), paths


def batch(tok, messages_only=True):
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    rendered = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "prompts": rendered,
        "columns": {"answer": ANSWERS, "prompt_messages": messages},
    }


def exact(prompts, responses, answer):
    return torch.tensor([float(r.strip() == a) for r, a in zip(responses, answer, strict=True)])


def runner(tok, paths, engine, multi_turn, generation=None, estimator="reinforce_pp"):
    actor = Actor.from_pretrained(paths["policy"], tok)
    policy = PolicySet(actor, None, None, LoadSettings(), tok, paths["policy"], uses_reference=False)
    generation = generation or GenerationSettings(max_new_tokens=200)
    algorithm = AlgorithmSettings(advantage_estimator=estimator, whiten_advantages=False)
    scorer = RewardScorer([RewardFunction(exact, name="exact")], algorithm, tok)
    engine.start(actor, "cpu")
    rollout = RolloutSettings(engine=engine, multi_turn=multi_turn)
    return RolloutRunner(
        policy,
        engine,
        scorer,
        generation=generation,
        rollout=rollout,
        algorithm=algorithm,
        kl=KLSettings(coef=0.0),
        kl_coef=KLController(0.0),
    )


def questions_file(tmp_path):
    """The four questions as chat records with their ``answer`` column (a ``PromptDataModule`` file)."""
    path = tmp_path / "questions.jsonl"
    with open(path, "w") as f:
        for q, a in zip(QUESTIONS, ANSWERS, strict=True):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a}) + "\n")
    return path
