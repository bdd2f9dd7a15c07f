/*
 * Anker usage dashboard. Signs in with an API key that is kept in sessionStorage only (this tab, until sign-out),
 * reads /v1/usage/summary and /v1/usage on the same origin and renders them. Nothing is loaded from elsewhere and
 * nothing from the API is ever parsed as HTML: all text goes through textContent.
 *
 * For tests: document.body.dataset.state is "signed-out", "loading", "ready" or "error", and every element that
 * shows an amount or a count carries the API's raw value in data-value.
 */
"use strict";

const KEY_STORAGE = "anker.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";
const DAY_MS = 24 * 60 * 60 * 1000;
const MONTHS = [
  "January", "February", "March", "April", "May", "June",
  "July", "August", "September", "October", "November", "December",
];

/*
 * formatDkk(decimalString): the display rule for DKK amounts, which the API sends as exact decimal strings.
 *  - Precision follows the exact absolute amount: >= 1 kr is shown to 2 decimals (øre), below 1 kr to 4 decimals.
 *    The choice is made before rounding, so "0.99995" -> "1,0000 kr".
 *  - Rounding is half-up on the absolute amount (a negative amount rounds like its positive twin, away from zero).
 *    A result that rounds to zero has no minus sign.
 *  - Danish separators: "," before the decimals and "." between groups of thousands; suffix " kr".
 *  - Arithmetic is BigInt on the decimal digits, never floating point, so every input string is handled exactly.
 *    Plain ("1234.5", ".5", "-3") and exponent ("1E+3", "0E-9") forms are accepted; anything else throws.
 * Examples: "0.001458" -> "0,0015 kr", "1234.5" -> "1.234,50 kr", "0" -> "0,0000 kr", "99.998590" -> "100,00 kr".
 */
function formatDkk(decimalString) {
  const match = /^\s*([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d{1,4}))?\s*$/.exec(String(decimalString));
  if (match === null || (match[2] === "" && !match[3])) {
    throw new TypeError("not a decimal amount: " + decimalString);
  }
  const fraction = match[3] || "";
  const digits = BigInt((match[2] || "0") + fraction);
  // The amount is digits / 10^scale; an exponent can make scale negative ("1E+3": digits 1, scale -3).
  const scale = fraction.length - Number(match[4] || "0");
  const atLeastOneKrone = scale <= 0 ? digits > 0n : digits >= 10n ** BigInt(scale);
  const decimals = atLeastOneKrone ? 2 : 4;
  let units; // the rounded absolute amount in steps of 10^-decimals kr
  if (scale <= decimals) {
    units = digits * 10n ** BigInt(decimals - scale);
  } else {
    const divisor = 10n ** BigInt(scale - decimals);
    units = digits / divisor;
    if ((digits % divisor) * 2n >= divisor) {
      units += 1n;
    }
  }
  const text = units.toString().padStart(decimals + 1, "0");
  const sign = match[1] === "-" && units > 0n ? "-" : "";
  return sign + groupThousands(text.slice(0, -decimals)) + "," + text.slice(-decimals) + " kr";
}

/* A whole count (token or request count) with "." between groups of thousands: 12345 -> "12.345". */
function formatCount(value) {
  const text = String(value);
  if (!/^-?\d+$/.test(text)) {
    throw new TypeError("not a whole count: " + value);
  }
  return text.startsWith("-") ? "-" + groupThousands(text.slice(1)) : groupThousands(text);
}

/* A percentage string from the API ("10", "12.5") in Danish form: "10 %", "12,5 %". */
function formatPercent(decimalString) {
  const text = String(decimalString);
  if (!/^-?\d+(\.\d+)?$/.test(text)) {
    throw new TypeError("not a percentage: " + decimalString);
  }
  return text.replace(".", ",") + " %";
}

function groupThousands(digits) {
  return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ".");
}

function monthLabel(month) {
  const [year, number] = String(month).split("-");
  const name = MONTHS[Number(number) - 1];
  return name === undefined ? String(month) : name + " " + year;
}

function dayLabel(isoTime) {
  const day = new Date(isoTime);
  return day.getUTCDate() + " " + MONTHS[day.getUTCMonth()] + " " + day.getUTCFullYear();
}

/* ---- The page ---- */

function byId(id) {
  const element = document.getElementById(id);
  if (element === null) {
    throw new Error("the page has no #" + id);
  }
  return element;
}

function setValue(element, text, raw) {
  element.textContent = text;
  if (raw === null || raw === undefined) {
    element.removeAttribute("data-value");
  } else {
    element.setAttribute("data-value", String(raw));
  }
}

function showDkk(id, raw) {
  setValue(byId(id), formatDkk(raw), raw);
}

function showCount(id, raw) {
  setValue(byId(id), formatCount(raw), raw);
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [attribute, value] of Object.entries(attributes || {})) {
    element.setAttribute(attribute, String(value));
  }
  return element;
}

/* sessionStorage can be unavailable (some privacy modes); the page then works for one load without remembering. */
function storedKey() {
  try {
    return window.sessionStorage.getItem(KEY_STORAGE);
  } catch (error) {
    return null;
  }
}

function storeKey(key) {
  try {
    window.sessionStorage.setItem(KEY_STORAGE, key);
  } catch (error) {
    /* not remembered: see storedKey */
  }
}

function forgetKey() {
  try {
    window.sessionStorage.removeItem(KEY_STORAGE);
  } catch (error) {
    /* nothing was stored */
  }
}

function setState(state) {
  document.body.dataset.state = state;
  document.body.dataset.signedIn = storedKey() === null ? "no" : "yes";
  if (state !== "error") {
    byId("error").textContent = "";
  }
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJson(path, key) {
  let response;
  try {
    response = await fetch(path, {
      headers: { Authorization: "Bearer " + key, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new ApiError(0, "Could not reach the API. Check your connection and try again.");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    // The API answers errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
    const message = body && body.error && typeof body.error.message === "string"
      ? body.error.message
      : ("The API answered " + response.status + " " + response.statusText).trim() + ".";
    throw new ApiError(response.status, message);
  }
  if (body === null) {
    throw new ApiError(response.status, "The API answered with something that is not JSON.");
  }
  return body;
}

// Each load gets a number; results of a load that was overtaken (new sign-in, sign-out) are dropped.
let currentLoad = 0;

async function load(key) {
  const thisLoad = ++currentLoad;
  setState("loading");
  try {
    const summary = await getJson("/v1/usage/summary", key);
    const range = new URLSearchParams({ start: summary.month_start, end: summary.month_end });
    const [daily, byModel] = await Promise.all([
      getJson("/v1/usage?" + range + "&group_by=day", key),
      getJson("/v1/usage?" + range + "&group_by=model", key),
    ]);
    if (thisLoad !== currentLoad) {
      return;
    }
    render(summary, daily, byModel);
    setState("ready");
  } catch (error) {
    if (thisLoad !== currentLoad) {
      return;
    }
    if (error instanceof ApiError && error.status === 401) {
      forgetKey();
    }
    byId("error").textContent = error instanceof ApiError
      ? error.message
      : "The dashboard could not show this usage data (" + error.message + ").";
    setState("error");
  }
}

function render(summary, daily, byModel) {
  byId("tenant").textContent = summary.tenant;
  setValue(byId("month"), monthLabel(summary.month), summary.month);
  byId("who").textContent = summary.tenant + " · key " + summary.key_id + " (" + summary.role + ")";

  const totals = summary.totals;
  showDkk("total-dkk", totals.cost_dkk);
  showCount("requests", totals.requests);
  showCount("tokens-uncached", totals.input_uncached_tokens);
  showCount("tokens-cached", totals.input_cached_tokens);
  showCount("tokens-output", totals.output_tokens);
  showDkk("cost-uncached", totals.cost_input_uncached_dkk);
  showDkk("cost-cached", totals.cost_input_cached_dkk);
  showDkk("cost-output", totals.cost_output_dkk);

  renderBudget(summary.budget);
  renderPlan(summary.plan);
  renderDailyChart(byId("daily-chart"), daily.data, summary.month_start, summary.month_end);
  renderModels(byModel.data);
}

function renderBudget(budget) {
  const left = byId("budget-left");
  const details = byId("budget-details");
  if (budget === null || budget === undefined) {
    setValue(left, "No budget set", null);
    left.classList.remove("over");
    details.hidden = true;
    for (const id of ["budget-limit", "budget-spent", "budget-reserved", "budget-scope"]) {
      setValue(byId(id), "", null);
    }
    return;
  }
  details.hidden = false;
  showDkk("budget-left", budget.left_dkk);
  left.classList.toggle("over", String(budget.left_dkk).trim().startsWith("-"));
  showDkk("budget-limit", budget.limit_dkk);
  showDkk("budget-spent", budget.spent_dkk);
  showDkk("budget-reserved", budget.reserved_dkk);
  byId("budget-scope").textContent = budget.scope + ", " + budget.kind;
}

function renderPlan(plan) {
  if (plan === null || plan === undefined) {
    byId("plan-name").textContent = "No plan";
    setValue(byId("plan-fee"), "", null);
    setValue(byId("plan-discount"), "", null);
    return;
  }
  byId("plan-name").textContent = plan.name;
  showDkk("plan-fee", plan.monthly_fee_dkk);
  setValue(byId("plan-discount"), formatPercent(plan.discount_percent), plan.discount_percent);
}

/*
 * One bar per day that has usage, placed in its day's slot of the month. Bar heights are the only place where an
 * amount becomes a float (Number), and only for drawing; every amount shown as text goes through formatDkk.
 */
function renderDailyChart(container, rows, monthStart, monthEnd) {
  container.replaceChildren();
  if (rows.length === 0) {
    const empty = document.createElement("p");
    empty.className = "muted";
    empty.textContent = "No usage this month.";
    container.append(empty);
    return;
  }
  const start = Date.parse(monthStart);
  const days = Math.max(1, Math.round((Date.parse(monthEnd) - start) / DAY_MS));
  const width = 720;
  const height = 240;
  const left = 84;
  const right = 8;
  const top = 14;
  const bottom = 26;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const slot = plotWidth / days;
  const highest = rows.reduce((a, b) => (Number(b.cost_dkk) > Number(a.cost_dkk) ? b : a));
  const max = Number(highest.cost_dkk);

  const svg = svgElement("svg", {
    viewBox: "0 0 " + width + " " + height,
    class: "chart-svg",
    role: "img",
    "aria-label": "Cost per day in DKK, " + rows.length + " days with usage",
  });
  const baseline = top + plotHeight;
  svg.append(svgElement("line", { x1: left, y1: top, x2: width - right, y2: top, class: "grid" }));
  svg.append(svgElement("line", { x1: left, y1: baseline, x2: width - right, y2: baseline, class: "axis" }));

  const maxLabel = svgElement("text", { x: left - 6, y: top + 4, class: "tick", "text-anchor": "end" });
  setValue(maxLabel, formatDkk(highest.cost_dkk), highest.cost_dkk);
  const zeroLabel = svgElement("text", { x: left - 6, y: baseline + 4, class: "tick", "text-anchor": "end" });
  setValue(zeroLabel, "0 kr", "0");
  svg.append(maxLabel, zeroLabel);

  for (let day = 1; day <= days; day += 1) {
    if (day === 1 || day % 5 === 0) {
      const tick = svgElement("text", {
        x: left + (day - 0.5) * slot, y: height - 8, class: "tick", "text-anchor": "middle",
      });
      tick.textContent = String(day);
      svg.append(tick);
    }
  }

  for (const row of rows) {
    const index = Math.min(days - 1, Math.max(0, Math.floor((Date.parse(row.start) - start) / DAY_MS)));
    const value = Number(row.cost_dkk);
    // A day with requests but (near) zero cost still gets a visible sliver.
    const barHeight = max > 0 ? Math.max(1, (value / max) * plotHeight) : 1;
    const bar = svgElement("rect", {
      x: left + index * slot + slot * 0.15,
      y: baseline - barHeight,
      width: Math.max(1, slot * 0.7),
      height: barHeight,
      class: "bar",
      "data-value": row.cost_dkk,
      "data-day": String(row.start).slice(0, 10),
      "data-requests": row.requests,
    });
    const tokens = row.input_uncached_tokens + row.input_cached_tokens + row.output_tokens;
    const title = svgElement("title");
    title.textContent = dayLabel(row.start) + ": " + formatDkk(row.cost_dkk) + ", "
      + formatCount(row.requests) + " requests, " + formatCount(tokens) + " tokens";
    bar.append(title);
    svg.append(bar);
  }
  container.append(svg);
}

function tableCell(text, raw, className) {
  const cell = document.createElement("td");
  setValue(cell, text, raw);
  if (className) {
    cell.className = className;
  }
  return cell;
}

function renderModels(rows) {
  const body = byId("by-model").tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const line = document.createElement("tr");
    line.append(
      tableCell(row.model === null ? "(unknown)" : row.model, null, "model"),
      tableCell(formatCount(row.requests), row.requests, "num"),
      tableCell(formatCount(row.input_uncached_tokens), row.input_uncached_tokens, "num"),
      tableCell(formatCount(row.input_cached_tokens), row.input_cached_tokens, "num"),
      tableCell(formatCount(row.output_tokens), row.output_tokens, "num"),
      tableCell(formatDkk(row.cost_dkk), row.cost_dkk, "num"),
    );
    body.append(line);
  }
  byId("by-model-empty").hidden = rows.length > 0;
}

function clearDashboard() {
  byId("daily-chart").replaceChildren();
  byId("by-model").tBodies[0].replaceChildren();
  byId("who").textContent = "";
  for (const element of document.querySelectorAll("#dashboard-view [data-value]")) {
    setValue(element, "", null);
  }
}

function signOut() {
  currentLoad += 1; // drops the results of a load still under way
  forgetKey();
  clearDashboard();
  setState("signed-out");
  byId("api-key").focus();
}

function start() {
  byId("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = byId("api-key");
    const key = input.value.trim();
    input.value = "";
    if (key === "") {
      byId("error").textContent = "Enter an API key.";
      setState("error");
      return;
    }
    storeKey(key);
    load(key);
  });
  byId("sign-out").addEventListener("click", signOut);
  byId("retry").addEventListener("click", () => {
    const key = storedKey();
    if (key === null) {
      signOut();
    } else {
      load(key);
    }
  });
  const key = storedKey();
  if (key === null) {
    setState("signed-out");
  } else {
    load(key);
  }
}

start();
