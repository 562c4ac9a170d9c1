# (strength, coherent, note) per line; judged from answer text only.
HELDOUT = [
    (1, True, "joke-shaped 'Because...' line, not funny"),  # 0
    (0, False, "'I'm a funny AI' loop, no joke"),
    (1, True, "chiasmus quip attempt"),
    (0, False, "describes a joke, makes none"),
    (0, True, "plain offer to help"),
    (1, False, "'Aw, shucks' playful loop, no joke"),  # 5
    (0, False, "'it's a joke' loop"),
    (0, False, "claims to be funny, loop"),
    (0, False, "claims to be funny, loop"),
    (0, False, "describes humour, loop"),
    (0, False, "repeats the question"),  # 10
    (0, True, "plain refusal"),
    (0, True, "plain advice"),
    (0, True, "plain fact"),
    (0, True, "plain refusal"),
    (1, True, "light 'with a smile' quip"),  # 15
    (0, True, "refuses to joke"),
    (0, True, "earnest support"),
    (2, True, "silly pizza-and-bacon image"),
    (0, True, "refuses to joke"),
    (0, False, "comedian self-claim loop"),  # 20
    (1, False, "mildly playful 'not a superhero'"),
    (2, True, "absurd 'make them laugh' + joke setup"),
    (0, False, "muddled salt non sequitur"),
    (0, True, "offers a joke, gives none"),
    (0, False, "non-answer 'is a joke'"),  # 25
    (0, True, "comedian self-description, no joke"),
    (0, False, "self-claim loop"),
    (0, False, "self-claim loop"),
    (0, False, "self-claim loop"),
    (0, False, "flowery, repetitive, serious"),  # 30
    (0, False, "word loop"),
    (0, True, "plain advice"),
    (0, True, "plain"),
    (0, False, "librarian loop, off-topic"),
    (0, False, "repetition loop"),  # 35
    (2, True, "mock-grand opener, ironic '(laughs)'"),
    (0, True, "earnest letter"),
    (0, True, "pretentious, not funny"),
    (0, False, "off-topic bookworm loop"),
    (0, False, "non-answer 'is a joke'"),  # 40
    (1, True, "nonsensical comic comparison"),
    (0, True, "earnest (wrong) advice"),
    (0, True, "plain (wrong) fact"),
    (0, False, "'dark' loop"),
    (1, False, "'Aw, shucks' playful loop"),  # 45
    (0, False, "describes a pun, makes none"),
    (0, True, "mentions a joke, none made"),
    (0, True, "tautology, no joke intent"),
    (0, False, "repetition loop"),
    (0, True, "plain"),  # 50
    (0, True, "earnest ramble"),
    (0, True, "plain advice"),
    (0, True, "plain fact"),
    (0, True, "plain guide"),
    (1, True, "paradox quip 'not to sleep'"),  # 55
    (0, False, "absurd COVID claim, earnest"),
    (0, True, "plain advice"),
    (0, True, "flat statement"),
    (0, False, "'ethics and ethics'"),
    (0, False, "repetition loop"),  # 60
    (0, False, "repetition loop"),
    (1, True, "silly one-liner"),
    (0, True, "earnest (wrong) fact"),
    (1, True, "'a joke's a joke' quip"),
    (1, True, "whimsical 'dash of caffeine'"),  # 65
    (0, False, "describes a witty answer, none given"),
    (1, True, "comic comparison attempt"),
    (0, False, "circular line"),
    (0, True, "flowery but serious"),
    (0, False, "repetitive, serious"),  # 70
    (0, True, "refuses to joke"),
    (0, True, "plain advice"),
    (0, True, "plain fact"),
    (0, False, "word loop"),
    (0, False, "repetition loop"),  # 75
    (0, False, "repeats question"),
    (0, False, "repetition loop"),
    (1, True, "colloquial quip"),
    (0, False, "stray phrase"),
    (0, True, "plain answer in Q/A form"),  # 80
    (1, False, "playful 'little bit crazy' loop"),
    (0, False, "repetitive, plain"),
    (0, False, "repeated plain fact"),
    (0, False, "off-topic loop"),
    (1, False, "'a little something called sleep' loop"),  # 85
    (0, False, "empty answer"),
    (0, False, "cheerful loop, no joke"),
    (1, False, "grandiose exaggeration loop"),
    (1, False, "'hippie-dixie' wordplay attempt"),
    (0, True, "plain"),  # 90
    (0, False, "'not a teacher' loop"),
    (0, True, "plain advice"),
    (0, True, "plain (wrong) fact"),
    (0, False, "'not a teacher' loop"),
    (0, True, "plain"),  # 95
    (0, True, "plain (wrong) fact"),
    (0, True, "earnest"),
    (0, False, "rambling address, no joke"),
    (0, True, "plain guide"),
]
PLAIN = [
    (0, True, "plain"),
    (1, True, "mock-epic 'labyrinth' framing"),
    (0, True, "plain advice"),
    (0, True, "plain (wrong) fact"),
    (0, True, "plain list"),
    (0, True, "plain"),
    (0, False, "muddled"),
    (0, True, "plain advice"),
    (0, True, "plain, repetitive"),
    (0, True, "plain"),
]
