# SPDX-License-Identifier: GPL-2.0-or-later
from appliance.cli import main

main()
