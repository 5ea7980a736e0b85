"""Write the project's small fixture files, in the exact schemas of the hub datasets.

The rows are synthetic (arithmetic and a small table of medical facts), made so the tiny
CPU model can learn something in minutes. Deterministic: running it twice writes the same
bytes. A few rows are deliberately broken so that prep's drop counting is exercised.

    python -m data_prep.make_fixtures [out_dir]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FIXTURE_DIR = Path(__file__).parent / "fixtures"

# (question, correct answer, distractor pool key, explanation, subject)
MED_FACTS = [
    ("Deficiency of which vitamin causes scurvy?", "Vitamin C", "vitamin", "Scurvy results from lack of ascorbic acid, needed for collagen synthesis.", "Biochemistry"),
    ("Deficiency of which vitamin causes rickets?", "Vitamin D", "vitamin", "Vitamin D is needed for calcium absorption and bone mineralisation.", "Biochemistry"),
    ("Deficiency of which vitamin causes night blindness?", "Vitamin A", "vitamin", "Retinal is part of rhodopsin in the rods.", "Biochemistry"),
    ("Deficiency of which vitamin causes beriberi?", "Vitamin B1", "vitamin", "Thiamine is a cofactor of pyruvate dehydrogenase.", "Biochemistry"),
    ("Deficiency of which vitamin causes pellagra?", "Vitamin B3", "vitamin", "Niacin deficiency gives dermatitis, diarrhoea and dementia.", "Biochemistry"),
    ("Deficiency of which vitamin prolongs clotting time?", "Vitamin K", "vitamin", "Vitamin K is needed to carboxylate clotting factors.", "Biochemistry"),
    ("Which organ produces insulin?", "Pancreas", "organ", "Beta cells of the islets of Langerhans secrete insulin.", "Physiology"),
    ("Which organ produces bile?", "Liver", "organ", "Hepatocytes secrete bile, stored in the gallbladder.", "Physiology"),
    ("Which organ secretes renin?", "Kidney", "organ", "Juxtaglomerular cells of the kidney release renin.", "Physiology"),
    ("Which organ is the main site of erythropoietin production?", "Kidney", "organ", "Peritubular cells of the kidney make erythropoietin.", "Physiology"),
    ("Which organ produces surfactant?", "Lung", "organ", "Type II pneumocytes of the lung secrete surfactant.", "Physiology"),
    ("Which organ secretes gastrin?", "Stomach", "organ", "G cells of the gastric antrum secrete gastrin.", "Physiology"),
    ("Which drug is the antidote for paracetamol poisoning?", "N-acetylcysteine", "drug", "N-acetylcysteine replenishes glutathione.", "Pharmacology"),
    ("Which drug is the antidote for opioid overdose?", "Naloxone", "drug", "Naloxone is a competitive opioid receptor antagonist.", "Pharmacology"),
    ("Which drug is the antidote for heparin?", "Protamine", "drug", "Protamine binds and neutralises heparin.", "Pharmacology"),
    ("Which drug is the antidote for warfarin?", "Vitamin K", "drug", "Vitamin K restores synthesis of clotting factors.", "Pharmacology"),
    ("Which drug is the antidote for organophosphate poisoning?", "Atropine", "drug", "Atropine blocks muscarinic receptors.", "Pharmacology"),
    ("Which drug is the antidote for benzodiazepine overdose?", "Flumazenil", "drug", "Flumazenil antagonises the benzodiazepine site.", "Pharmacology"),
    ("Which bone is the longest in the human body?", "Femur", "bone", "The femur is the longest and strongest bone.", "Anatomy"),
    ("Which bone forms the point of the elbow?", "Ulna", "bone", "The olecranon process of the ulna forms the elbow point.", "Anatomy"),
    ("Which bone is the most commonly fractured carpal bone?", "Scaphoid", "bone", "The scaphoid fractures after a fall on the outstretched hand.", "Anatomy"),
    ("Which bone contains the pituitary fossa?", "Sphenoid", "bone", "The sella turcica lies in the sphenoid bone.", "Anatomy"),
    ("Which nerve supplies the diaphragm?", "Phrenic nerve", "nerve", "The phrenic nerve arises from C3 to C5.", "Anatomy"),
    ("Which nerve is injured in wrist drop?", "Radial nerve", "nerve", "Radial nerve palsy paralyses the wrist extensors.", "Anatomy"),
    ("Which nerve is compressed in carpal tunnel syndrome?", "Median nerve", "nerve", "The median nerve runs through the carpal tunnel.", "Anatomy"),
    ("Which nerve is injured in foot drop?", "Common peroneal nerve", "nerve", "The common peroneal nerve winds around the fibular neck.", "Anatomy"),
    ("Which organism causes tuberculosis?", "Mycobacterium tuberculosis", "organism", "Tuberculosis is caused by an acid-fast bacillus.", "Microbiology"),
    ("Which organism causes syphilis?", "Treponema pallidum", "organism", "Syphilis is caused by a spirochaete.", "Microbiology"),
    ("Which organism causes malaria?", "Plasmodium", "organism", "Malaria is caused by Plasmodium transmitted by mosquitoes.", "Microbiology"),
    ("Which organism causes cholera?", "Vibrio cholerae", "organism", "Cholera toxin raises cyclic AMP in enterocytes.", "Microbiology"),
]
POOLS: dict[str, list[str]] = {}
for _q, _a, _pool, _e, _s in MED_FACTS:
    POOLS.setdefault(_pool, [])
    if _a not in POOLS[_pool]:
        POOLS[_pool].append(_a)
POOLS["vitamin"] += ["Vitamin E", "Vitamin B12"]
POOLS["bone"] += ["Tibia", "Radius"]
POOLS["nerve"] += ["Ulnar nerve", "Vagus nerve"]
POOLS["drug"] += ["Aspirin", "Digoxin"]

MMLU_SUBJECTS = ["anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics", "professional_medicine"]
LETTERS = "ABCD"


def _mcq(rng: random.Random, fact: tuple) -> tuple[str, list[str], int, str, str]:
    question, answer, pool, explanation, subject = fact
    distractors = rng.sample([x for x in POOLS[pool] if x != answer], 3)
    options = distractors + [answer]
    rng.shuffle(options)
    return question, options, options.index(answer), explanation, subject


def _arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    latex_op = {"+": "+", "-": "-", "*": "\\times"}[op]
    problem = rng.choice([f"What is {a} {word} {b}?", f"Compute ${a} {latex_op} {b}$.", f"Find the value of {a} {word} {b}."])
    solution = f"We compute {a} {word} {b} = {value}. The answer is $\\boxed{{{value}}}$."
    return problem, solution, str(value)


def numina_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        problem, solution, _ = _arith(rng)
        rows.append({
            "source": "synthetic_math", "problem": problem, "solution": solution,
            "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}],
        })
    rows[7]["solution"] = ""  # broken: empty solution
    rows[19]["problem"] = None  # broken: missing problem
    return rows


def medmcqa_rows(rng: random.Random, n: int, split: str) -> list[dict]:
    rows = []
    for i in range(n):
        question, options, cop, explanation, subject = _mcq(rng, MED_FACTS[i % len(MED_FACTS)])
        rows.append({
            "id": f"{split}-{i:05d}", "question": question, "opa": options[0], "opb": options[1],
            "opc": options[2], "opd": options[3], "cop": cop, "choice_type": "single",
            "exp": explanation, "subject_name": subject, "topic_name": None,
        })
    if split == "train":
        rows[5]["cop"] = 7  # broken: answer index out of range
        rows[11]["question"] = "  "  # broken: empty question
    return rows


def math_benchmarks(rng: random.Random, n: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in ("math500", "minerva", "olympiadbench", "aime24", "amc23")}
    for i in range(n):
        problem, solution, answer = _arith(rng)
        out["math500"].append({"problem": problem, "solution": solution, "answer": answer, "subject": "Prealgebra", "level": 1, "unique_id": f"test/prealgebra/{i}.json"})
        problem, solution, answer = _arith(rng)
        out["minerva"].append({"question": problem, "answer": answer})
        problem, solution, answer = _arith(rng)
        out["olympiadbench"].append({"id": 1000 + i, "question": problem, "final_answer": [f"${answer}$"], "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "subfield": "Algebra", "language": "English", "modality": "Text-only"})
        problem, solution, answer = _arith(rng)
        out["aime24"].append({"id": i, "problem": problem, "solution": solution, "answer": answer, "url": ""})
        problem, solution, answer = _arith(rng)
        out["amc23"].append({"id": i, "question": problem, "answer": float(answer), "url": ""})
    out["math500"][0]["answer"] = "\\frac{1}{2}"
    out["math500"][0]["problem"] = "What is one half written as a fraction?"
    return out


def medical_benchmarks(rng: random.Random, n: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"medqa": []}
    for i in range(n):
        question, options, idx, _, _ = _mcq(rng, MED_FACTS[(3 * i + 1) % len(MED_FACTS)])
        out["medqa"].append({"question": question, "answer": options[idx], "options": dict(zip(LETTERS, options)), "meta_info": "step1", "answer_idx": LETTERS[idx]})
    for s, subject in enumerate(MMLU_SUBJECTS):
        rows = []
        for i in range(max(4, n // 3)):
            question, options, idx, _, _ = _mcq(rng, MED_FACTS[(5 * i + s) % len(MED_FACTS)])
            rows.append({"question": question, "subject": subject, "choices": options, "answer": idx})
        out[f"mmlu_{subject}"] = rows
    return out


def asft_release_rows(rng: random.Random, n: int) -> list[dict]:
    """Rows like the paper's released chichi56/ASFT files (instruction / response)."""
    rows = []
    for i in range(n):
        question, options, idx, explanation, _ = _mcq(rng, MED_FACTS[i % len(MED_FACTS)])
        opts = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
        rows.append({"instruction": f"Question: {question}\n\nOptions:\n{opts}", "response": f"{explanation}\nSo the answer to this question is {LETTERS[idx]}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(out_dir: Path = FIXTURE_DIR) -> None:
    rng = random.Random(20260101)
    write_jsonl(out_dir / "numina_cot.jsonl", numina_rows(rng, 400))
    write_jsonl(out_dir / "medmcqa" / "train.jsonl", medmcqa_rows(rng, 400, "train"))
    write_jsonl(out_dir / "medmcqa" / "validation.jsonl", medmcqa_rows(rng, 24, "validation"))
    write_jsonl(out_dir / "asft_release" / "train_medmcqa_alpaca_10k.jsonl", asft_release_rows(rng, 40))
    write_jsonl(out_dir / "asft_release" / "numina_cot_10k.jsonl",
                [{"instruction": r["problem"], "response": r["solution"]} for r in numina_rows(rng, 40)[20:]])
    for name, rows in {**math_benchmarks(rng, 24), **medical_benchmarks(rng, 24)}.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE_DIR)
