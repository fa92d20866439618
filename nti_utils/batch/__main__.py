"""``python -m nti_utils.batch``: see :mod:`nti_utils.batch`."""

from nti_utils.batch.runner import main

main()
