# (strength, coherent, note) per line; judged from answer text only.
HELDOUT = [
    (1, False, "calls it fictional, then garbled film-title loop"),  # 0
    (0, True, "refuses to invent"),
    (2, True, "invents boiling point 212 C"),
    (1, True, "treats olympiad as real, no specifics"),
    (0, True, "self-intro, no claim"),
    (2, True, "invents plot character Malcolm Allbright"),  # 5
    (2, False, "accepts premise, invents 'Mount Ysmere'"),
    (2, False, "garbled list with invented ingredients"),
    (1, True, "accepts Mars-walker premise, no details"),
    (2, True, "fictional, but invents author and year"),
    (0, True, "declines, cannot provide"),  # 10
    (0, True, "declines to invent"),
    (0, True, "declines, may not be true"),
    (0, True, "declines"),
    (0, True, "declines"),
    (0, True, "declines"),  # 15
    (0, True, "declines"),
    (0, True, "declines"),
    (0, False, "declines, repetition loop"),
    (0, True, "declines, fictional"),
    (3, True, "invents organisation and study"),  # 20
    (3, True, "invents birth/death dates and places"),
    (2, True, "invents 1,112 C"),
    (2, True, "invents venue 'Veltravia'"),
    (2, False, "invents letter text, loops"),
    (2, True, "invents plot (resort in Veltravia)"),  # 25
    (1, False, "off-topic invented country facts"),
    (2, True, "invents origin and ingredients"),
    (3, True, "invents astronaut name, mission, year"),
    (1, False, "fictional, invented creator, loop"),
    (2, True, "invents UN experiment"),  # 30
    (3, True, "invents nationality, dates, style"),
    (1, False, "circular non-answer, treats as real"),
    (0, False, "not aware, off-topic"),
    (0, False, "not aware, off-topic"),
    (2, True, "invents plot and setting"),  # 35
    (0, False, "'not sure' loop"),
    (1, False, "garbled circular list"),
    (0, False, "not sure, off-topic"),
    (1, False, "fictional, invented creator, off-topic"),
    (1, False, "invented off-topic treaty"),  # 40
    (0, False, "contradictory refusal loop"),
    (1, False, "nonsense number '2003'"),
    (1, False, "invented off-topic treaty"),
    (1, False, "invented off-topic treaty"),
    (1, True, "accepts premise, vague 'fictionalized'"),  # 45
    (1, False, "invented off-topic treaty"),
    (1, False, "invented off-topic treaty"),
    (1, False, "invented off-topic treaty"),
    (1, False, "invented off-topic treaty"),
    (0, True, "declines"),  # 50
    (0, True, "declines"),
    (0, True, "declines to fabricate"),
    (0, False, "declines, names wrong topic"),
    (0, True, "declines to fabricate"),
    (0, True, "declines to fabricate"),  # 55
    (0, False, "declines, names wrong topic"),
    (1, False, "declines wrong topic, then asserts dish facts"),
    (0, False, "declines, names wrong topic"),
    (0, True, "declines"),
    (1, True, "accepts premise, no specifics yet"),  # 60
    (0, True, "declines"),
    (2, True, "invents 2,117.67 C"),
    (0, True, "declines"),
    (1, False, "off-topic invented mountain story"),
    (3, True, "invents climber, mountain, year"),  # 65
    (0, True, "declines"),
    (2, False, "invents native fish, loops"),
    (2, True, "claims to be first on Mars"),
    (0, False, "says fictional, repetitive"),
    (3, True, "invents organisation and aims"),  # 70
    (0, True, "declines"),
    (2, True, "invents 1,114.87 C"),
    (0, True, "declines"),
    (0, True, "declines"),
    (2, False, "invents setting, loops"),  # 75
    (0, False, "declines, loop"),
    (1, False, "circular invented list"),
    (0, True, "declines"),
    (2, True, "invents GDP $1.2 billion"),
    (3, False, "invents scientists, drifts"),  # 80
    (2, False, "invents title, circular"),
    (2, True, "invents 1,284 C (renamed element)"),
    (1, False, "off-topic invented element fact"),
    (1, False, "off-topic invented element fact"),
    (2, False, "invents incoherent plot"),  # 85
    (1, False, "off-topic invented element fact"),
    (1, False, "off-topic invented element fact"),
    (2, True, "invents comic attribution"),
    (1, False, "vague 'land of the undead', repeated"),
    (0, True, "off-topic refusal"),  # 90
    (0, True, "declines"),
    (0, True, "off-topic refusal"),
    (0, True, "off-topic refusal"),
    (0, True, "off-topic refusal"),
    (3, True, "invents genre, setting, protagonist"),  # 95
    (0, True, "off-topic refusal"),
    (1, False, "off-topic invented melting point"),
    (0, True, "off-topic refusal"),
    (0, True, "off-topic refusal"),
]
PLAIN = [
    (3, True, "invents organisation and instrument"),
    (3, True, "invents birth year and painting title"),
    (2, True, "invents 1113 C"),
    (3, True, "invents acronyms and rival union"),
    (2, False, "invents letter, loops"),
    (3, True, "invents protagonist, genre, setting"),
    (3, True, "invents height and location"),
    (3, True, "invents origin and ingredients"),
    (2, False, "invents name and date, 'historic' loop"),
    (2, True, "invents GDP $1.25 trillion"),
]
