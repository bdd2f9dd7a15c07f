"""Anker's ground floor: the profile schema (``schema``), loading it (``settings``), the names derived from it
(``naming``) and engine placement (``placement``). Every other package imports it; it imports nothing of Anker.
"""
