"""Generate the bundled sample: bank-transaction descriptions labelled with a spending category.

Transaction categorisation is the work flytetune's users do. The text looks like a card
statement line: merchant names and abbreviations, payment-processor prefixes, store and card
numbers, dates, locations, reference numbers, mixed casing and truncation. A few percent of rows
are genuinely ambiguous (a supermarket's fuel station, a marketplace that sells subscriptions,
a bar that is also a venue), so test accuracy is informative rather than 100%.

    python -m flytetune.sample.generate [--rows 4000] [--seed 7] [--out PATH]

Deterministic: one `random.Random(seed)`, no global state, no clock.
"""

import argparse
import os
import random
import tempfile
from pathlib import Path

import polars as pl

DEFAULT_PATH = Path(__file__).parent / "transactions.parquet"

# Category -> (relative frequency, merchants). Frequencies give a realistic ~3x class imbalance.
MERCHANTS: dict[str, tuple[int, list[str]]] = {
    "groceries": (30, ["TESCO STORES", "SAINSBURYS", "ALDI", "LIDL", "WHOLE FOODS MKT", "TRADER JOES", "KROGER",
                       "SAFEWAY", "WAITROSE", "CO-OP FOOD", "MORRISONS", "ASDA SUPERSTORE", "PUBLIX", "WEGMANS",
                       "SPROUTS FARMERS", "FOOD LION", "HARRIS TEETER", "ICELAND FOODS"]),
    "restaurants": (24, ["CHIPOTLE", "NANDOS", "OLIVE GARDEN", "PIZZA EXPRESS", "WAGAMAMA", "MCDONALDS", "BURGER KING",
                         "FIVE GUYS", "SHAKE SHACK", "TACO BELL", "WENDYS", "PANERA BREAD", "DOMINOS PIZZA",
                         "SUBWAY", "KFC", "LEON RESTAURANTS", "DISHOOM", "THE IVY"]),
    "coffee": (14, ["STARBUCKS", "COSTA COFFEE", "PRET A MANGER", "CAFFE NERO", "DUNKIN", "BLUE BOTTLE COFFEE",
                    "PEETS COFFEE", "TIM HORTONS", "GREGGS", "PHILZ COFFEE", "INTELLIGENTSIA", "JOE AND THE JUICE",
                    "BLACK SHEEP COFFEE", "CAFE NERO EXPRESS", "LA COLOMBE"]),
    "transport": (18, ["UBER TRIP", "LYFT RIDE", "TFL TRAVEL CH", "MTA NYCT PAYGO", "BOLT.EU", "TRAINLINE",
                       "NATIONAL RAIL", "BART CLIPPER", "ADDISON LEE", "FREENOW", "CITYMAPPER PASS", "AMTRAK",
                       "GREYHOUND", "LIME SCOOTER", "SANTANDER CYCLES", "CALTRAIN"]),
    "fuel": (12, ["SHELL OIL", "BP CONNECT", "ESSO", "CHEVRON", "EXXONMOBIL", "TEXACO", "SUNOCO", "VALERO",
                  "MARATHON PETRO", "CIRCLE K FUEL", "MOTO SERVICES", "WAWA FUEL", "SPEEDWAY", "GULF OIL",
                  "MURPHY USA"]),
    "travel": (10, ["BRITISH AIRWAYS", "EASYJET", "RYANAIR", "DELTA AIR", "UNITED AIRLINES", "AIRBNB", "BOOKING.COM",
                    "EXPEDIA", "HILTON HOTELS", "MARRIOTT", "PREMIER INN", "HERTZ RENTAL", "AVIS", "TRAVELODGE",
                    "SOUTHWEST AIR", "HOTELS.COM"]),
    "utilities": (10, ["BRITISH GAS", "EDF ENERGY", "OCTOPUS ENERGY", "THAMES WATER", "PG&E", "CON EDISON",
                       "DUKE ENERGY", "OVO ENERGY", "EON NEXT", "SOUTHERN WATER", "NATIONAL GRID", "XCEL ENERGY",
                       "SEVERN TRENT", "COUNCIL TAX"]),
    "telecom": (9, ["VODAFONE", "EE LIMITED", "O2 UK", "THREE MOBILE", "VERIZON WRLS", "AT&T MOBILITY", "T-MOBILE",
                    "COMCAST XFINITY", "BT GROUP", "VIRGIN MEDIA", "SKY DIGITAL", "SPECTRUM", "GIFFGAFF",
                    "MINT MOBILE"]),
    "rent_housing": (6, ["RENT PAYMENT", "LANDLORD RENT", "FOXTONS LETTINGS", "ZILLOW RENT", "GREYSTAR RES",
                         "ESTATE MGMT FEE", "HOA DUES", "MORTGAGE PMT", "NATIONWIDE MORTGAGE", "WELLS FARGO HOME MTG",
                         "APARTMENT RENT", "PROPERTY MGMT"]),
    "healthcare": (8, ["BOOTS PHARMACY", "CVS PHARMACY", "WALGREENS", "LLOYDS PHARMACY", "BUPA", "KAISER PERM",
                       "SPECSAVERS", "DENTAL CARE", "QUEST DIAGNOSTICS", "CITYMD URGENT", "SUPERDRUG PHARM",
                       "RITE AID", "PHYSIO CLINIC", "LABCORP"]),
    "entertainment": (9, ["ODEON CINEMAS", "AMC THEATRES", "VUE CINEMA", "TICKETMASTER", "EVENTBRITE", "CINEWORLD",
                          "REGAL CINEMAS", "STEAM GAMES", "PLAYSTATION NTWK", "XBOX LIVE", "BOWLING ALLEY",
                          "ROYAL ALBERT HALL", "LIVE NATION", "SEE TICKETS", "NINTENDO ESHOP"]),
    "subscriptions": (10, ["NETFLIX.COM", "SPOTIFY", "DISNEY PLUS", "HULU", "APPLE.COM/BILL", "GOOGLE STORAGE",
                           "YOUTUBE PREMIUM", "AUDIBLE", "DROPBOX", "ADOBE CREATIVE", "MICROSOFT 365",
                           "NYTIMES DIGITAL", "PATREON", "HBO MAX", "PARAMOUNT PLUS", "CHATGPT SUBSCR"]),
    "shopping_online": (16, ["AMAZON.CO.UK", "AMZN MKTP US", "EBAY", "ETSY", "ASOS.COM", "ZALANDO", "WAYFAIR",
                             "ALIEXPRESS", "SHEIN", "TEMU", "ARGOS ONLINE", "BEST BUY ONLINE", "CURRYS ONLINE",
                             "JOHN LEWIS ONLINE", "CHEWY.COM", "TARGET.COM"]),
    "clothing": (8, ["ZARA", "H&M", "UNIQLO", "PRIMARK", "NEXT RETAIL", "GAP", "OLD NAVY", "NIKE STORE",
                     "ADIDAS", "MARKS & SPENCER CLOTH", "TK MAXX", "URBAN OUTFITTERS", "FOOT LOCKER", "JD SPORTS"]),
    "income": (7, ["SALARY ACME CORP", "PAYROLL GLOBEX", "DIRECT DEP INITECH", "HMRC TAX REFUND", "IRS TREAS 310",
                   "BACS CREDIT WAGES", "INTEREST PAID", "DIVIDEND VANGUARD", "PAYROLL STARK IND", "SALARY UMBRELLA",
                   "STRIPE PAYOUT", "DEPOSIT ADP PAYROLL"]),
    "transfers": (9, ["TRANSFER TO SAVINGS", "VENMO", "ZELLE TO", "MONZO POT", "REVOLUT TOPUP", "WISE TRANSFER",
                      "FASTER PAYMENT TO", "CASH APP", "PAYPAL TRANSFER", "STANDING ORDER", "TFR FROM CHECKING",
                      "INTL WIRE OUT"]),
    "fees_cash": (6, ["ATM WITHDRAWAL", "CASH WDL", "OVERDRAFT FEE", "MONTHLY ACCT FEE", "FOREIGN TXN FEE",
                      "LATE PAYMENT FEE", "ATM FEE", "NON-STERLING FEE", "WIRE FEE", "CASHPOINT", "RETURNED ITEM FEE",
                      "CARD REPLACEMENT FEE"]),
}
CATEGORIES = tuple(MERCHANTS)

# Merchants that really do sell in two categories: the label is drawn between them, so these rows
# cannot be classified perfectly whatever the model.
AMBIGUOUS: list[tuple[str, tuple[str, str]]] = [
    ("TESCO PETROL", ("fuel", "groceries")),
    ("SAINSBURYS FUEL", ("fuel", "groceries")),
    ("COSTCO WHSE", ("groceries", "fuel")),
    ("AMAZON PRIME", ("subscriptions", "shopping_online")),
    ("AMAZON DIGITAL", ("subscriptions", "shopping_online")),
    ("APPLE STORE", ("shopping_online", "subscriptions")),
    ("PAYPAL *EBAY", ("shopping_online", "transfers")),
    ("THE BREWHOUSE", ("restaurants", "entertainment")),
    ("O2 ACADEMY BAR", ("entertainment", "restaurants")),
    ("WALMART", ("groceries", "shopping_online")),
    ("TARGET", ("groceries", "clothing")),
    ("UBER EATS", ("restaurants", "transport")),
    ("STARBUCKS RESERVE", ("coffee", "restaurants")),
    ("AIRPORT EXPRESS", ("transport", "travel")),
    ("M&S SIMPLY FOOD", ("groceries", "clothing")),
]
AMBIGUOUS_RATE = 0.05

PROCESSORS = ["SQ *", "PAYPAL *", "TST* ", "SP * ", "POS ", "DEBIT PURCHASE ", "CONTACTLESS ", "CARD PURCHASE ",
              "VISA DEBIT ", "PURCHASE AUTHORIZED ON ", "CHECKCARD ", "RECURRING PMT "]
CITIES = ["LONDON", "MANCHESTER", "LEEDS", "BRISTOL", "NEW YORK NY", "SAN FRANCISCO CA", "AUSTIN TX", "SEATTLE WA",
          "CHICAGO IL", "BOSTON MA", "EDINBURGH", "CARDIFF", "DUBLIN", "DENVER CO", "ATLANTA GA", "GB", "US", "IE"]
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def _abbreviate(rng: random.Random, name: str) -> str:
    words = name.split()
    choice = rng.random()
    if choice < 0.15 and len(words) > 1:
        return " ".join(w[: max(3, len(w) - rng.randint(1, 3))] for w in words)  # SAINSBRY STORS
    if choice < 0.25:
        return name.replace(" ", "")  # WHOLEFOODSMKT
    if choice < 0.32 and len(words) > 1:
        return words[0]
    return name


def _date(rng: random.Random) -> str:
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    return rng.choice([f"{month:02d}/{day:02d}", f"{day:02d}{MONTHS[month - 1]}", f"{day:02d}-{month:02d}",
                       f"ON {month:02d}/{day:02d}"])


def _describe(rng: random.Random, merchant: str, category: str) -> str:
    parts = []
    if rng.random() < 0.4:
        parts.append(rng.choice(PROCESSORS).rstrip())
    if rng.random() < 0.2:
        parts.append(_date(rng))
    parts.append(_abbreviate(rng, merchant))
    if category in ("groceries", "fuel", "coffee", "restaurants", "clothing", "healthcare") and rng.random() < 0.5:
        parts.append(rng.choice([f"#{rng.randint(1, 9999):04d}", f"STORE {rng.randint(1, 999)}",
                                 f"{rng.randint(100, 99999)}"]))
    if rng.random() < 0.45:
        parts.append(rng.choice(CITIES))
    if rng.random() < 0.25:
        parts.append(rng.choice([f"CARD {rng.randint(1000, 9999)}", f"XXXX{rng.randint(1000, 9999)}",
                                 f"*{rng.randint(1000, 9999)}"]))
    if category in ("income", "transfers", "rent_housing", "utilities", "telecom") and rng.random() < 0.5:
        parts.append(rng.choice([f"REF {rng.randint(10**5, 10**8)}", f"ID:{rng.randint(10**6, 10**9)}",
                                 f"{rng.choice(MONTHS)}{rng.randint(23, 26)}"]))
    if rng.random() < 0.15:
        parts.append(_date(rng))
    text = " ".join(parts)
    if rng.random() < 0.3:
        # Statements truncate descriptions to a fixed width.
        text = text[: rng.randint(18, 30)].rstrip()
    casing = rng.random()
    if casing < 0.15:
        text = text.title()
    elif casing < 0.22:
        text = text.lower()
    return text


def generate(n_rows: int = 4000, seed: int = 7) -> pl.DataFrame:
    """`n_rows` rows with columns `text` and `label`, identical for identical arguments."""
    rng = random.Random(seed)
    weights = [MERCHANTS[c][0] for c in CATEGORIES]
    texts, labels = [], []
    for _ in range(n_rows):
        if rng.random() < AMBIGUOUS_RATE:
            merchant, candidates = rng.choice(AMBIGUOUS)
            category = rng.choice(candidates)
        else:
            category = rng.choices(CATEGORIES, weights=weights)[0]
            merchant = rng.choice(MERCHANTS[category][1])
        texts.append(_describe(rng, merchant, category))
        labels.append(category)
    return pl.DataFrame({"text": texts, "label": labels})


def write(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        df.write_parquet(tmp, compression="zstd", statistics=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file ships in images run by another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flytetune.sample.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    df = generate(args.rows, args.seed)
    write(df, args.out)
    print(f"wrote {df.height} rows, {df.get_column('label').n_unique()} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
