-- Prepended to every money script when it is loaded (see lua.py): Redis's own clock and the
-- UTC calendar periods, so that no process clock ever decides money.

local function redis_now_us(override)
  local given = tonumber(override)
  if given then
    return given
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Days since 1970-01-01 -> (year, month), and back (H. Hinnant's civil calendar algorithms).
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp + 3
  if mp >= 10 then
    m = mp - 9
  end
  if m <= 2 then
    y = y + 1
  end
  return y, m
end

local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then
    mp = m - 3
  end
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- Epoch seconds of the start of the UTC day and month containing now_us.
local function period_starts(now_us)
  local days = math.floor(now_us / 86400000000)
  local y, m = civil_from_days(days)
  return days * 86400, days_from_civil(y, m, 1) * 86400
end

-- The budget hash field holding a period's settled spend. A key stored without a period is
-- 'monthly', as the keys service shows it (SPEC section 8's default).
local function period_field(period, day_start, month_start)
  if period == 'daily' then
    return 'd:' .. string.format('%d', day_start)
  elseif period == 'total' then
    return 'total'
  end
  return 'm:' .. string.format('%d', month_start)
end

local function ms_of(now_us)
  return math.floor(now_us / 1000)
end

local function fmt(n)
  return string.format('%.0f', n)
end
