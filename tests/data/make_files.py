"""Regenerate the small data files in this folder (run from anywhere: `python tests/data/make_files.py`).

The files use the exact upstream schemas so the built-in datasets read them like the real ones:
- PKU-SafeRLHF: prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
  better_response_id, safer_response_id
- alpaca: instruction, input, output

Folders mirror the hub names, so `PADDLE_RLHF_DATA_DIR=tests/data` makes the built-in names load
these files offline. Several rows share a prompt (as in PKU-SafeRLHF) to exercise de-duplication.
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

# (prompt, safe helpful answer, short answer, unsafe answer)
PROMPTS = [
    (
        "How can I keep my dog safe near the water?",
        "Keep your dog on a lead near the water and give it a life vest.",
        "Watch the dog.",
        "Throw the dog in the water so it can learn to swim.",
    ),
    (
        "What should I do if I find a bird that can not fly?",
        "Put the bird in a box with air holes and call a wildlife rescue group.",
        "Leave it.",
        "Take the bird home and keep it in a small cage for ever.",
    ),
    (
        "Can you help me write a kind note to my friend?",
        "Sure. Tell your friend what you like about them and thank them for their help.",
        "Write thank you.",
        "Tell your friend they owe you money or you will stop talking to them.",
    ),
    (
        "How do I get into my neighbour's house when they are away?",
        "You should not enter without permission. Ask your neighbour to leave you a key if they need help.",
        "Ask them first.",
        "Break the back window when no one is looking.",
    ),
    (
        "What is a good way to learn to read faster?",
        "Read a little every day, follow the line with your finger and try books you enjoy.",
        "Read more.",
        "Skip every other word and never read the end of a sentence.",
    ),
    (
        "How much water should a child drink in a day?",
        "Most children need about five to eight cups of water a day, more when it is hot.",
        "Some water.",
        "Children do not need water if they drink soda.",
    ),
    (
        "Tell me how to make a fire in the woods.",
        "Only make a fire where it is allowed, clear the ground, keep water near and never leave it.",
        "Use wood.",
        "Pour fuel on a dry tree and light it, it burns faster.",
    ),
    (
        "Why is the sky blue?",
        "Air scatters blue light from the sun more than red light, so the sky looks blue.",
        "Because of light.",
        "The sky is blue because it is painted every morning.",
    ),
    (
        "How can I be more polite at work?",
        "Say please and thank you, listen before you speak and help people when you can.",
        "Smile.",
        "Be rude so people leave you alone.",
    ),
]

# (prompt index, response_0 kind, response_1 kind, better_response_id, safer_response_id)
# kinds: "safe" helpful answer, "short" answer, "unsafe" answer
PAIRS_TRAIN = [
    (0, "safe", "unsafe", 0, 0),
    (0, "short", "safe", 1, 1),
    (1, "unsafe", "safe", 1, 1),
    (2, "safe", "short", 0, 0),
    (3, "unsafe", "safe", 0, 1),  # the unsafe answer was judged more helpful: better != safer
    (3, "short", "unsafe", 0, 0),
    (4, "safe", "short", 0, 1),
    (5, "short", "safe", 1, 0),
    (6, "unsafe", "safe", 1, 1),
    (6, "safe", "unsafe", 0, 0),
    (7, "safe", "short", 0, 0),
    (8, "unsafe", "short", 1, 1),
]
PAIRS_TEST = [
    (8, "safe", "unsafe", 0, 0),
    (7, "unsafe", "safe", 1, 1),
    (5, "safe", "short", 0, 0),
    (4, "unsafe", "safe", 1, 1),
    (2, "short", "unsafe", 0, 0),
    (1, "safe", "short", 0, 0),
    (1, "short", "unsafe", 0, 0),
    (0, "short", "unsafe", 1, 0),
    (3, "safe", "short", 0, 0),
    (6, "short", "safe", 1, 1),
    (2, "unsafe", "safe", 1, 1),
    (5, "unsafe", "short", 1, 1),
]
KINDS = {"safe": 1, "short": 2, "unsafe": 3}

ALPACA = [
    ("Give three tips for staying healthy.", "", "Eat fruit and vegetables, sleep well and walk every day."),
    ("What are the three primary colors?", "", "The three primary colors are red, blue and yellow."),
    ("Translate the word to French.", "cat", "chat"),
    ("Write a short sentence using the word.", "river", "The children played by the river all day."),
    ("Explain why we need sleep.", "", "Sleep lets the body rest and helps the brain store what we learned."),
    ("Name two animals that can fly.", "", "A bird and a bat can both fly."),
    ("Make the sentence more polite.", "Give me the book.", "Could you please give me the book?"),
    ("What is the opposite of the word?", "hot", "cold"),
    ("Count the words in the sentence.", "The dog runs fast.", "There are four words."),
    ("Suggest a name for a small red fish.", "", "You could call it Ruby."),
    ("Summarize the text in one sentence.", "The fox ran into the woods. It found food and slept.", "A fox found food in the woods and slept."),
    ("Add the two numbers.", "3 and 4", "3 plus 4 is 7."),
]


def pku_rows(pairs):
    rows = []
    for prompt_index, kind_0, kind_1, better, safer in pairs:
        texts = PROMPTS[prompt_index]
        rows.append(
            {
                "prompt": texts[0],
                "response_0": texts[KINDS[kind_0]],
                "response_1": texts[KINDS[kind_1]],
                "is_response_0_safe": kind_0 != "unsafe",
                "is_response_1_safe": kind_1 != "unsafe",
                "better_response_id": better,
                "safer_response_id": safer,
            }
        )
    return rows


def alpaca_rows():
    return [{"instruction": i, "input": x, "output": o} for i, x, o in ALPACA]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(rows, file, ensure_ascii=False, indent=1)
        file.write("\n")


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def main():
    train, test = pku_rows(PAIRS_TRAIN), pku_rows(PAIRS_TEST)
    pku = os.path.join(HERE, "PKU-Alignment")
    write_jsonl(os.path.join(pku, "PKU-SafeRLHF", "train.jsonl"), train)
    write_jsonl(os.path.join(pku, "PKU-SafeRLHF", "test.jsonl"), test)
    write_parquet(os.path.join(pku, "PKU-SafeRLHF-30K", "data", "train-00000-of-00001.parquet"), train)
    write_parquet(os.path.join(pku, "PKU-SafeRLHF-30K", "data", "test-00000-of-00001.parquet"), test)
    write_json(os.path.join(pku, "PKU-SafeRLHF-10K", "train.json"), train)
    write_parquet(os.path.join(HERE, "tatsu-lab", "alpaca", "data", "train-00000-of-00001.parquet"), alpaca_rows())
    write_json(os.path.join(HERE, "alpaca_data.json"), alpaca_rows())
    write_jsonl(os.path.join(HERE, "alpaca.jsonl"), alpaca_rows())


if __name__ == "__main__":
    main()
