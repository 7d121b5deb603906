"""Branch-aware names, so that people working on the same pipeline from different branches never
overwrite each other's images, registrations or published models.

CI stamps the branch into the image (`FLYTETUNE_BRANCH`) beside the commit (`FLYTETUNE_CODE_VERSION`);
the same rule names image tags and registration versions (.github/workflows/images.yml).
"""

import os
import re

MAX_BRANCH = 40


def sanitise_branch(branch: str) -> str:
    """`Feature/ABC_12` -> `feature-abc-12`: lowercase, [a-z0-9-], at most 40 characters."""
    name = re.sub(r"[^a-z0-9]+", "-", branch.lower()).strip("-")
    return name[:MAX_BRANCH].rstrip("-") or "detached"


def branch_tag() -> str | None:
    """`<branch>-<short sha>` of the code in this image, or None outside a CI-built image."""
    branch = os.environ.get("FLYTETUNE_BRANCH")
    if not branch:
        return None
    sha = os.environ.get("FLYTETUNE_CODE_VERSION", "")[:7]
    return f"{sanitise_branch(branch)}-{sha}" if sha else sanitise_branch(branch)
