"""Two hand-made people and their articles, shared by the evaluation and judge tests."""

from lacy.corpus.people import Entity

ADA = Entity(name="Ada Lovelace", title="Ada Lovelace", doc_id="42",
             description="British chemist (1920–1990)", birth_year=1920,
             birth_place="Leeds, United Kingdom", occupation="chemist")
# 12 words a passage: [0] "Ada Lovelace (born 1920) ... Leeds. She", [1] "studied ... In 1950 she
# moved", [2] "to Paris ...": the year 1950 is in the article but not in the birth passage.
ADA_ARTICLE = ("Ada Lovelace (born 1920) was a British chemist born in Leeds. She studied chemistry at "
               "Oxford and won many prizes. In 1950 she moved to Paris where she founded a laboratory "
               "of her own.")
BOB = Entity(name="Bob Marley", title="Bob Marley", doc_id="7", description="", birth_year=1945,
             birth_place="Nine Mile, Jamaica", occupation="singer")
BOB_ARTICLE = "Bob Marley (6 February 1945 – 11 May 1981) was a Jamaican singer born in Nine Mile."
ARTICLES = {"42": {"id": "42", "title": "Ada Lovelace", "text": ADA_ARTICLE},
            "7": {"id": "7", "title": "Bob Marley", "text": BOB_ARTICLE}}
