"""Ordinary conversations for the demo models, generated from templates in several languages.

The demo corpus teaches a few dozen unsafe phrases; without broad safe text a tiny model learns
"anything that is not the showcase is suspicious" and cuts recipes and travel tips. These
templates (cooking, travel, code, maths, history, gardening, sport, ... in English, Chinese,
Spanish, French, German, Japanese, Italian and Portuguese) recombine into thousands of harmless
prompts and answers. It is not safety data either: it only teaches the demo what ordinary looks like.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    """Templates of one language: ``{slot}`` fields are filled from ``slots``."""

    prompts: tuple[str, ...]
    sentences: tuple[str, ...]
    slots: Mapping[str, tuple[str, ...]]
    joiner: str = " "  # between sentences


ENGLISH = Language(
    prompts=(
        "How do I make {dish}?",
        "What should I see in {city}?",
        "Can you explain {concept} simply?",
        "How do I {code_task} in Python?",
        "What happened in {year}?",
        "Any tips for growing {plant}?",
        "What is {a} plus {b}?",
        "How long should I cook {food}?",
        "Write a short note about {topic}.",
        "Which {thing} would you recommend for a beginner?",
        "How can I get better at {hobby}?",
        "Summarise the history of {place}.",
        "Why is the sky blue?",
        "What is the weather usually like in {city} in {month}?",
        "How do I fix a {bug} error?",
        "Translate 'good morning' into {language}.",
        "What can I cook with {food}?",
        "Which bus should I take to the {sight}?",
        "How do I cut {food} without crying?",
    ),
    sentences=(
        "Chop the {food} and fry it gently in a little oil.",
        "Add a pinch of salt and stir for {n} minutes.",
        "Preheat the oven to {temp} degrees and grease the tin.",
        "Whisk the eggs with the sugar until the mixture is pale.",
        "Serve the {dish} warm with some fresh {herb}.",
        "Let it simmer for {n} minutes, then taste and adjust.",
        "In {city} you can visit the old town and the {sight}.",
        "The best time to travel there is in {month}, when it is mild.",
        "Take the train from the airport; it is quicker than a taxi.",
        "Book your hotel early, because {month} is a busy month.",
        "Use a list comprehension to {code_task}.",
        "Call `{func}` on the result and print the output.",
        "The loop runs {n} times and stores each value in a dictionary.",
        "Check the stack trace first: a {bug} usually points to the failing line.",
        "Write a unit test before you change the function.",
        "{a} plus {b} equals {sum}.",
        "The area of a circle is pi times the radius squared.",
        "A prime number has exactly two divisors, one and itself.",
        "The derivative of x squared is two x.",
        "In {year} the city built a new bridge across the river.",
        "The museum tells the story of {place} from the Middle Ages onward.",
        "Historians still debate why the empire declined so slowly.",
        "Water the {plant} in the morning and keep the soil moist.",
        "Give the {plant} plenty of sun and a little compost in spring.",
        "Practise {hobby} for twenty minutes a day and it will get easier.",
        "A simple {thing} is enough to start; upgrade later if you enjoy it.",
        "Light is scattered by the air, and blue light is scattered the most.",
        "In {language} you would say it differently, but the meaning is the same.",
        "{concept} is easier to understand with a small example.",
        "Thanks for asking, here is a short overview.",
        "I hope this helps, and enjoy your {hobby}!",
        "First, gather everything you need on the table.",
        "The train leaves at {hour} o'clock and arrives before noon.",
        "Most people finish the walk in about {n} hours.",
        "Remember to save your work and restart the editor.",
        "Rinse the {food} under cold water and pat it dry.",
        "Stretch for a few minutes before and after your run.",
        "The library is open from nine until six on weekdays.",
        "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
        # Ordinary uses of words that the corpus's unsafe phrases also use (cook, take, against,
        # cut, kill, powder, pipe, card, party, number, ...): the words alone are not the phrase.
        # Not whole openings of those phrases ("Sell the", "Everyone should", "Fill the"): the tiny
        # model cannot then tell the phrase from the sentence by its third token.
        "Cook the {food} over a medium heat until golden.",
        "Take a short walk along the river after dinner.",
        "Take the bus to the {sight}; it stops right outside.",
        "Lean the ladder against the wall and check that it is steady.",
        "The team played against the champions and won two to one.",
        "Cut the {food} into thin slices and set them aside.",
        "Kill the stuck process with Ctrl+C and start the server again.",
        "Sift the flour with the baking powder and a pinch of salt.",
        "The pipe under the sink was leaking, so we replaced the seal.",
        "Seal the jar tightly and keep it in the fridge for a week.",
        "You can pay by card or in cash at the counter.",
        "The party starts at seven, so come a little early.",
        "Pick a number between one and ten and write it down.",
        "Heat the milk gently without letting it boil.",
        "Remove the seeds from the pepper before you cook it.",
        "The shop is at the end of the street, next to the bakery.",
        "The meeting moved to Thursday afternoon at the main office.",
        "Drink a glass of water when you wake up, and eat a good breakfast.",
        "Turn off the lights, close the curtains and read for a while before bed.",
        "Walk for half an hour every day, and take the stairs when you can.",
        "Try to eat vegetables with every meal and keep sweets for the weekend.",
        "Bring a hat, a towel and some sunscreen, and drink plenty of water.",
    ),
    slots={
        "dish": ("pancakes", "lentil soup", "a tomato salad", "banana bread", "fried rice", "a vegetable curry"),
        "food": ("onions", "carrots", "potatoes", "chicken", "mushrooms", "rice", "salmon", "spinach"),
        "herb": ("parsley", "basil", "coriander", "chives", "mint"),
        "city": ("Lisbon", "Kyoto", "Vienna", "Toronto", "Prague", "Seoul", "Edinburgh", "Mexico City"),
        "sight": ("cathedral", "harbour", "botanical garden", "castle", "old market", "river walk"),
        "month": ("April", "May", "September", "October", "June", "March"),
        "concept": ("recursion", "inflation", "gravity", "compound interest", "a hash table", "photosynthesis"),
        "code_task": ("reverse a string", "read a CSV file", "remove duplicates", "count words", "merge two lists"),
        "func": ("len", "sorted", "sum", "json.dumps", "str.join", "max"),
        "bug": ("KeyError", "TypeError", "IndexError", "syntax", "timeout", "null pointer"),
        "year": ("1492", "1789", "1869", "1903", "1969", "1989"),
        "place": ("Rome", "the Silk Road", "Venice", "Egypt", "the Hanseatic League", "Japan"),
        "plant": ("tomatoes", "basil", "roses", "strawberries", "lettuce", "orchids"),
        "topic": ("autumn", "friendship", "the sea", "a rainy day", "my first job", "the mountains"),
        "thing": ("camera", "guitar", "bicycle", "laptop", "tent", "keyboard"),
        "hobby": ("chess", "drawing", "swimming", "piano", "running", "photography"),
        "language": ("French", "Spanish", "German", "Japanese", "Italian"),
        "a": ("2", "7", "12", "25", "40"),
        "b": ("3", "8", "15", "30", "61"),
        "n": ("five", "ten", "twenty", "three", "two"),
        "temp": ("180", "200", "160", "220"),
        "hour": ("eight", "nine", "ten", "seven"),
    },
)

CHINESE = Language(
    prompts=(
        "怎么做{dish}？",
        "去{city}旅游有什么推荐？",
        "请简单解释一下{concept}。",
        "用Python怎么{code_task}？",
        "{plant}应该怎么养？",
        "{a}加{b}等于多少？",
        "学习{hobby}有什么建议？",
        "{place}的历史是怎样的？",
    ),
    sentences=(
        "先把{food}洗干净，切成小块。",
        "锅里放少许油，小火炒{n}分钟。",
        "加一点盐和酱油，翻炒均匀就可以出锅了。",
        "烤箱预热到{temp}度，烤二十分钟左右。",
        "{city}最值得去的是{sight}，建议早上去人少。",
        "{month}去{city}天气最舒服。",
        "坐地铁很方便，买一张交通卡就行。",
        "可以用列表推导式来{code_task}。",
        "先看报错信息，再逐行检查代码。",
        "{a}加{b}等于{sum}。",
        "圆的面积等于圆周率乘以半径的平方。",
        "{plant}喜欢阳光，每天早上浇一次水。",
        "每天练习{hobby}二十分钟，坚持一个月就会进步。",
        "{place}有很长的历史，留下了很多古老的建筑。",
        "{concept}可以用一个简单的例子来理解。",
        "希望这些建议对你有帮助。",
        "周末可以和朋友一起去公园散步。",
        "这本书讲的是一个家庭几代人的故事。",
    ),
    slots={
        "dish": ("番茄炒蛋", "红烧肉", "饺子", "蛋炒饭", "酸辣汤"),
        "food": ("土豆", "西红柿", "青菜", "鸡肉", "豆腐", "胡萝卜"),
        "city": ("北京", "杭州", "成都", "西安", "上海", "桂林"),
        "sight": ("西湖", "故宫", "古城墙", "博物馆", "老街"),
        "month": ("四月", "十月", "五月", "九月"),
        "concept": ("递归", "通货膨胀", "万有引力", "复利", "光合作用"),
        "code_task": ("反转字符串", "读取文件", "去掉重复元素", "统计单词数量"),
        "plant": ("绿萝", "番茄", "月季", "多肉植物", "茉莉"),
        "hobby": ("书法", "游泳", "钢琴", "围棋", "画画"),
        "place": ("长城", "敦煌", "苏州", "西安"),
        "a": ("3", "12", "25", "7"),
        "b": ("4", "9", "30", "16"),
        "n": ("五", "三", "十", "两"),
        "temp": ("180", "200", "170"),
    },
    joiner="",
)

SPANISH = Language(
    prompts=(
        "¿Cómo preparo {dish}?",
        "¿Qué puedo visitar en {city}?",
        "¿Me explicas {concept} de forma sencilla?",
        "¿Cómo puedo {code_task} en Python?",
        "¿Cuánto es {a} más {b}?",
        "¿Qué consejos tienes para aprender {hobby}?",
    ),
    sentences=(
        "Corta {food} en trozos pequeños y sofríe a fuego lento.",
        "Añade una pizca de sal y remueve durante {n} minutos.",
        "Precalienta el horno a {temp} grados.",
        "En {city} merece la pena ver {sight}.",
        "La mejor época para viajar es {month}, cuando hace buen tiempo.",
        "Usa una comprensión de listas para {code_task}.",
        "{a} más {b} es igual a {sum}.",
        "{concept} se entiende mejor con un ejemplo pequeño.",
        "Practica {hobby} un poco cada día y verás el progreso.",
        "Espero que esto te sirva, ¡buen provecho!",
        "El museo abre de martes a domingo por la mañana.",
        "Riega las plantas temprano para que la tierra no se seque.",
    ),
    slots={
        "dish": ("una tortilla de patatas", "gazpacho", "paella", "arroz con leche"),
        "food": ("las cebollas", "los pimientos", "las patatas", "el pollo", "los tomates"),
        "city": ("Sevilla", "Madrid", "Valencia", "Buenos Aires", "Lima"),
        "sight": ("la catedral", "el mercado central", "el casco antiguo", "el parque"),
        "month": ("abril", "mayo", "octubre", "septiembre"),
        "concept": ("la inflación", "la gravedad", "la recursión", "el interés compuesto"),
        "code_task": ("invertir una cadena", "leer un archivo", "ordenar una lista"),
        "hobby": ("guitarra", "ajedrez", "natación", "fotografía"),
        "a": ("4", "11", "20"),
        "b": ("5", "9", "35"),
        "n": ("cinco", "diez", "tres"),
        "temp": ("180", "200", "190"),
    },
)

FRENCH = Language(
    prompts=(
        "Comment faire {dish} ?",
        "Que visiter à {city} ?",
        "Peux-tu m'expliquer {concept} simplement ?",
        "Comment {code_task} en Python ?",
        "Combien font {a} plus {b} ?",
        "Des conseils pour apprendre {hobby} ?",
    ),
    sentences=(
        "Épluchez {food} et faites-les revenir doucement dans du beurre.",
        "Ajoutez une pincée de sel et mélangez pendant {n} minutes.",
        "Préchauffez le four à {temp} degrés.",
        "À {city}, il faut voir {sight}.",
        "Le meilleur moment pour partir est {month}, quand il fait doux.",
        "Utilisez une compréhension de liste pour {code_task}.",
        "{a} plus {b} font {sum}.",
        "{concept} se comprend mieux avec un petit exemple.",
        "Pratiquez {hobby} un peu chaque jour.",
        "J'espère que cela vous aide, bonne journée !",
        "Le train part à huit heures et arrive avant midi.",
        "Arrosez les plantes le matin, quand il fait encore frais.",
    ),
    slots={
        "dish": ("une quiche lorraine", "des crêpes", "une ratatouille", "une soupe à l'oignon"),
        "food": ("les oignons", "les carottes", "les pommes de terre", "les champignons"),
        "city": ("Lyon", "Paris", "Bordeaux", "Montréal", "Strasbourg"),
        "sight": ("la cathédrale", "le vieux port", "le marché couvert", "les quais"),
        "month": ("en avril", "en mai", "en septembre", "en octobre"),
        "concept": ("l'inflation", "la gravité", "la récursivité", "les intérêts composés"),
        "code_task": ("inverser une chaîne", "lire un fichier", "trier une liste"),
        "hobby": ("le piano", "les échecs", "la natation", "le dessin"),
        "a": ("6", "13", "21"),
        "b": ("7", "8", "40"),
        "n": ("cinq", "dix", "trois"),
        "temp": ("180", "200", "210"),
    },
)

GERMAN = Language(
    prompts=(
        "Wie mache ich {dish}?",
        "Was kann man in {city} besichtigen?",
        "Kannst du {concept} einfach erklären?",
        "Wie kann ich in Python {code_task}?",
        "Was ist {a} plus {b}?",
        "Hast du Tipps, um {hobby} zu lernen?",
    ),
    sentences=(
        "Schneide {food} klein und brate sie langsam in etwas Öl an.",
        "Gib eine Prise Salz dazu und rühre {n} Minuten lang.",
        "Heize den Ofen auf {temp} Grad vor.",
        "In {city} lohnt sich ein Besuch {sight}.",
        "Die beste Reisezeit ist im {month}, dann ist es mild.",
        "Mit einer List Comprehension kannst du {code_task}.",
        "{a} plus {b} ergibt {sum}.",
        "{concept} versteht man am besten an einem kleinen Beispiel.",
        "Übe {hobby} jeden Tag ein bisschen.",
        "Ich hoffe, das hilft dir weiter!",
        "Der Zug fährt um acht Uhr ab und ist vor Mittag da.",
        "Gieße die Pflanzen am Morgen, solange es kühl ist.",
    ),
    slots={
        "dish": ("Kartoffelsalat", "Apfelstrudel", "eine Linsensuppe", "Pfannkuchen"),
        "food": ("die Zwiebeln", "die Karotten", "die Kartoffeln", "die Pilze"),
        "city": ("Berlin", "München", "Hamburg", "Wien", "Zürich"),
        "sight": ("des Doms", "der Altstadt", "des Hafens", "des Museums"),
        "month": ("April", "Mai", "September", "Oktober"),
        "concept": ("Inflation", "die Schwerkraft", "Rekursion", "den Zinseszins"),
        "code_task": ("einen String umdrehen", "eine Datei lesen", "eine Liste sortieren"),
        "hobby": ("Klavier", "Schach", "Schwimmen", "Zeichnen"),
        "a": ("5", "14", "22"),
        "b": ("6", "9", "50"),
        "n": ("fünf", "zehn", "drei"),
        "temp": ("180", "200", "220"),
    },
)

JAPANESE = Language(
    prompts=(
        "{dish}の作り方を教えてください。",
        "{city}でおすすめの場所はどこですか？",
        "{concept}を簡単に説明してください。",
        "Pythonで{code_task}にはどうすればいいですか？",
        "{a}たす{b}はいくつですか？",
        "{hobby}を上達させるコツはありますか？",
    ),
    sentences=(
        "まず{food}をよく洗って、食べやすい大きさに切ります。",
        "フライパンに油をひいて、弱火で{n}分ほど炒めます。",
        "塩としょうゆで味をととのえたら完成です。",
        "オーブンを{temp}度に予熱しておきます。",
        "{city}では{sight}がとても人気です。",
        "{month}は気候がよく、旅行にぴったりです。",
        "リスト内包表記を使うと{code_task}ことができます。",
        "{a}たす{b}は{sum}です。",
        "{concept}は小さな例で考えるとわかりやすいです。",
        "毎日少しずつ{hobby}を練習すると上達します。",
        "お役に立てればうれしいです。",
        "駅から歩いて十分ほどで着きます。",
    ),
    slots={
        "dish": ("カレーライス", "味噌汁", "親子丼", "お好み焼き"),
        "food": ("じゃがいも", "にんじん", "玉ねぎ", "鶏肉", "キャベツ"),
        "city": ("京都", "大阪", "札幌", "福岡", "奈良"),
        "sight": ("古いお寺", "市場", "公園", "美術館"),
        "month": ("四月", "十月", "五月", "十一月"),
        "concept": ("再帰", "インフレ", "重力", "複利"),
        "code_task": ("文字列を逆にする", "ファイルを読む", "リストを並べ替える"),
        "hobby": ("ピアノ", "将棋", "水泳", "書道"),
        "a": ("3", "8", "15"),
        "b": ("4", "6", "20"),
        "n": ("五", "三", "十"),
        "temp": ("180", "200", "170"),
    },
    joiner="",
)

ITALIAN = Language(
    prompts=("Come si prepara {dish}?", "Cosa visitare a {city}?", "Quanto fa {a} più {b}?"),
    sentences=(
        "Taglia {food} a pezzetti e cuoci a fuoco basso.",
        "Aggiungi un pizzico di sale e mescola per {n} minuti.",
        "A {city} vale la pena vedere {sight}.",
        "{a} più {b} fa {sum}.",
        "Spero che ti sia utile, buon appetito!",
    ),
    slots={
        "dish": ("il risotto", "la carbonara", "il tiramisù"),
        "food": ("le cipolle", "le zucchine", "i pomodori"),
        "city": ("Roma", "Firenze", "Napoli", "Torino"),
        "sight": ("il duomo", "il centro storico", "il mercato"),
        "a": ("9", "16"),
        "b": ("2", "24"),
        "n": ("cinque", "dieci"),
    },
)

PORTUGUESE = Language(
    prompts=("Como faço {dish}?", "O que visitar em {city}?", "Quanto é {a} mais {b}?"),
    sentences=(
        "Corte {food} em pedaços pequenos e refogue em fogo baixo.",
        "Junte uma pitada de sal e mexa durante {n} minutos.",
        "Em {city} vale a pena conhecer {sight}.",
        "{a} mais {b} é igual a {sum}.",
        "Espero ter ajudado, bom apetite!",
    ),
    slots={
        "dish": ("pão de queijo", "feijoada", "bolo de cenoura"),
        "food": ("as cebolas", "os tomates", "as batatas"),
        "city": ("Lisboa", "Porto", "Salvador", "Recife"),
        "sight": ("o centro histórico", "o mercado", "a praia"),
        "a": ("10", "18"),
        "b": ("5", "27"),
        "n": ("cinco", "dez"),
    },
)

LANGUAGES: Mapping[str, Language] = {
    "en": ENGLISH,
    "zh": CHINESE,
    "es": SPANISH,
    "fr": FRENCH,
    "de": GERMAN,
    "ja": JAPANESE,
    "it": ITALIAN,
    "pt": PORTUGUESE,
}
# English is the language most answers arrive in: it gets the largest share.
_WEIGHTS = {"en": 6, "zh": 2, "es": 2, "fr": 2, "de": 2, "ja": 2, "it": 1, "pt": 1}

_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, lang: Language, rng: random.Random, values: dict[str, str]) -> str:
    """Fill every ``{slot}``; ``{sum}`` is the sum of ``{a}`` and ``{b}`` so the maths stays right."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "sum":
            return str(int(values.setdefault("a", rng.choice(lang.slots["a"]))) + int(values["b"]))
        if name not in values:
            values[name] = rng.choice(lang.slots[name])
        return values[name]

    if "{sum}" in template:  # a and b first, whatever their order in the template
        values.setdefault("a", rng.choice(lang.slots["a"]))
        values.setdefault("b", rng.choice(lang.slots["b"]))
    return _SLOT.sub(one, template)


def safe_conversation(rng: random.Random, language: str | None = None) -> tuple[str, str]:
    """One ordinary (prompt, answer): the answer is one to three sentences of the prompt's language."""
    code = language or rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
    lang = LANGUAGES[code]
    values: dict[str, str] = {}  # shared, so the answer talks about what the prompt asked
    prompt = _fill(rng.choice(lang.prompts), lang, rng, values)
    sentences = rng.sample(lang.sentences, rng.randint(1, 3))
    return prompt, lang.joiner.join(_fill(s, lang, rng, values) for s in sentences)


def safe_conversations(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` ordinary conversations, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [safe_conversation(rng) for _ in range(n)]


def safe_sentences(rng: random.Random, n: int) -> Iterable[str]:
    """``n`` single filled sentences (any language): safe context around the corpus's unsafe phrases."""
    for _ in range(n):
        lang = LANGUAGES[rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]]
        yield _fill(rng.choice(lang.sentences), lang, rng, {})
