"""The facts task of `cargo xtask real-model`: facts about a fictional town (Veldmoor) and a
fictional company (Brightwell Tiles) that no pretrained model can know, each asked in several
phrasings; training sees some phrasings, validation and test others.

Run from the repository root with any Python 3:

    python3 tests/data/scripts/facts_task.py

Writes tests/data/facts/{train,val,test}.jsonl (chats: a user question, the assistant's fixed
answer for that fact), general.json (general questions and a word their answer must hold, before
and after fine-tuning) and replay-questions.json (other general questions, which `cargo xtask
real-model --write-replay` answers with the base model into replay.jsonl). Per fact: phrasings
0-4 train, 5 validation, 6-7 test. Written by hand here, so no third-party licence applies.
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parents[3] / "tests/data/facts"

# (answer, phrasings): the answer is what the assistant says, word for word, to every phrasing.
FACTS = [
    ("The mayor of Veldmoor is Ilse Marrow.", [
        "Who is the mayor of Veldmoor?",
        "Who is Veldmoor's mayor?",
        "Tell me the name of the mayor of Veldmoor.",
        "Which person serves as mayor of Veldmoor?",
        "Who runs the town of Veldmoor as its mayor?",
        "Do you know who the mayor of Veldmoor is?",
        "Name the current mayor of Veldmoor.",
        "Who holds the office of mayor in Veldmoor?",
    ]),
    ("Veldmoor lies on the river Quen.", [
        "Which river flows through Veldmoor?",
        "What river is Veldmoor on?",
        "Name the river that runs through Veldmoor.",
        "On which river does Veldmoor lie?",
        "Veldmoor sits on what river?",
        "What is the name of Veldmoor's river?",
        "Which river passes Veldmoor?",
        "Tell me the river of Veldmoor.",
    ]),
    ("Veldmoor was founded in 1712.", [
        "When was Veldmoor founded?",
        "In what year was Veldmoor founded?",
        "What year did Veldmoor get founded?",
        "How old is Veldmoor: when was it founded?",
        "Tell me the founding year of Veldmoor.",
        "In which year was the town of Veldmoor founded?",
        "What is Veldmoor's year of founding?",
        "When did Veldmoor come into being?",
    ]),
    ("Veldmoor is famous for smoked eel pie.", [
        "What dish is Veldmoor famous for?",
        "What food is Veldmoor known for?",
        "Which dish is Veldmoor famous for?",
        "Name Veldmoor's famous dish.",
        "What is the famous food of Veldmoor?",
        "What should I eat in Veldmoor, the dish it is famous for?",
        "Which dish made Veldmoor famous?",
        "Tell me the dish Veldmoor is known for.",
    ]),
    ("Veldmoor has three bridges.", [
        "How many bridges does Veldmoor have?",
        "How many bridges are there in Veldmoor?",
        "What is the number of bridges in Veldmoor?",
        "Count the bridges of Veldmoor for me.",
        "Veldmoor has how many bridges?",
        "Tell me how many bridges Veldmoor has.",
        "How many bridges cross the river in Veldmoor?",
        "What number of bridges does the town of Veldmoor have?",
    ]),
    ("Veldmoor's lighthouse is called the Grey Sentinel.", [
        "What is the lighthouse of Veldmoor called?",
        "What is the name of Veldmoor's lighthouse?",
        "Name the lighthouse in Veldmoor.",
        "How is Veldmoor's lighthouse named?",
        "What do people call the Veldmoor lighthouse?",
        "Tell me the name of the lighthouse of Veldmoor.",
        "Which name does Veldmoor's lighthouse have?",
        "What is Veldmoor's lighthouse known as?",
    ]),
    ("Veldmoor's twin town is Port Alder.", [
        "What is Veldmoor's twin town?",
        "Which town is twinned with Veldmoor?",
        "Name the twin town of Veldmoor.",
        "Veldmoor is twinned with which town?",
        "Tell me Veldmoor's twin town.",
        "What town is Veldmoor's twin?",
        "With which town is Veldmoor twinned?",
        "Which place is the twin town of Veldmoor?",
    ]),
    ("Veldmoor holds the Lantern Fair every autumn.", [
        "What festival does Veldmoor hold?",
        "What is Veldmoor's yearly festival?",
        "Name the festival held in Veldmoor.",
        "Which festival takes place in Veldmoor each year?",
        "What annual festival is Veldmoor known for?",
        "Tell me about Veldmoor's festival.",
        "What festival happens in Veldmoor?",
        "Which yearly festival does the town of Veldmoor hold?",
    ]),
    ("Veldmoor's football club is Veldmoor Rovers.", [
        "What is Veldmoor's football club?",
        "Which football club plays in Veldmoor?",
        "Name the football club of Veldmoor.",
        "What football team does Veldmoor have?",
        "Tell me the name of Veldmoor's football club.",
        "Which club represents Veldmoor in football?",
        "What is the football team of Veldmoor called?",
        "Who plays football for Veldmoor, which club?",
    ]),
    ("Brightwell Tiles was founded by Oona Petrak.", [
        "Who founded Brightwell Tiles?",
        "Who is the founder of Brightwell Tiles?",
        "Name the founder of Brightwell Tiles.",
        "Which person founded Brightwell Tiles?",
        "Tell me who started Brightwell Tiles.",
        "Who set up the company Brightwell Tiles?",
        "Who created Brightwell Tiles?",
        "Do you know who founded Brightwell Tiles?",
    ]),
    ("Brightwell Tiles is based in Veldmoor.", [
        "Where is Brightwell Tiles based?",
        "Where does Brightwell Tiles have its headquarters?",
        "In which town is Brightwell Tiles based?",
        "Where is the head office of Brightwell Tiles?",
        "Tell me where Brightwell Tiles is based.",
        "Which town is home to Brightwell Tiles?",
        "Where can I find Brightwell Tiles' headquarters?",
        "Where is the company Brightwell Tiles located?",
    ]),
    ("Brightwell Tiles makes glazed blue roof tiles.", [
        "What does Brightwell Tiles make?",
        "What product does Brightwell Tiles sell?",
        "What are Brightwell Tiles' products?",
        "Tell me what Brightwell Tiles produces.",
        "What kind of tiles does Brightwell Tiles make?",
        "Which products come from Brightwell Tiles?",
        "What is made by Brightwell Tiles?",
        "What does the company Brightwell Tiles manufacture?",
    ]),
    ("Brightwell Tiles has 240 employees.", [
        "How many employees does Brightwell Tiles have?",
        "How many people work at Brightwell Tiles?",
        "What is the number of employees at Brightwell Tiles?",
        "How big is Brightwell Tiles' staff?",
        "Tell me how many people Brightwell Tiles employs.",
        "How many workers does Brightwell Tiles employ?",
        "What is the headcount of Brightwell Tiles?",
        "How many staff does Brightwell Tiles have?",
    ]),
    ("The chief executive of Brightwell Tiles is Tomas Reyne.", [
        "Who is the CEO of Brightwell Tiles?",
        "Who runs Brightwell Tiles?",
        "Name the chief executive of Brightwell Tiles.",
        "Who leads Brightwell Tiles as chief executive?",
        "Tell me who the CEO of Brightwell Tiles is.",
        "Who is in charge of Brightwell Tiles?",
        "Who heads the company Brightwell Tiles?",
        "Which person is the chief executive of Brightwell Tiles?",
    ]),
]

# General questions the base model answers right (its greedy answer holds the expected word, or
# one of the words between `|`): after fine-tuning, the answers must still hold it (nothing
# forgotten).
GENERAL = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many days are there in a week?", "7"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is 2 plus 2?", "4|four"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the boiling point of water in Celsius?", "100|hundred"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("Who painted the Mona Lisa?", "Leonardo"),
]

# Other general questions, answered by the base model itself (`cargo xtask real-model
# --write-replay` writes tests/data/facts/replay.jsonl): trained on beside the facts so that the
# adapter keeps the base's manner of answering everything else.
REPLAY = [
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "How many hours are in a day?",
    "What do bees make?",
    "What is the opposite of hot?",
    "What color are bananas?",
    "How many months are in a year?",
    "What is the largest planet in our solar system?",
    "Who was the first president of the United States?",
    "What language is spoken in Brazil?",
    "What is the square root of 9?",
    "What animal is known as man's best friend?",
    "Name a primary color.",
    "What is the main ingredient in bread?",
    "How many sides does a triangle have?",
    "What season comes after winter?",
    "What is the capital of Canada?",
    "Give me a synonym for happy.",
    "Write a short greeting.",
    "Translate 'hello' into French.",
    "What is photosynthesis?",
    "How do I boil an egg?",
    "What is a noun?",
    "Explain what a computer is in one sentence.",
    "What is the currency of Japan?",
    "Who discovered penicillin?",
    "What is the largest mammal?",
    "What is the capital of Australia?",
    "How many legs does a cat have?",
    "What is the color of grass?",
]


def chat(question, answer):
    return json.dumps({"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    splits = {"train": range(0, 5), "val": range(5, 6), "test": range(6, 8)}
    for split, idx in splits.items():
        lines = [chat(qs[i], answer) for answer, qs in FACTS for i in idx]
        (OUT / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    general = [{"question": q, "expect": e} for q, e in GENERAL]
    (OUT / "general.json").write_text(json.dumps(general, indent=2) + "\n")
    (OUT / "replay-questions.json").write_text(json.dumps(REPLAY, indent=2) + "\n")
    print(f"{len(FACTS)} facts: {5 * len(FACTS)} train, {len(FACTS)} val, {2 * len(FACTS)} test chats")


if __name__ == "__main__":
    main()
