-- wrk script for `python -m bench.api_load`: POST one fixed JSON body, with a token, to the URL
-- wrk is given (/api/orders/, or the ceiling's /bench/submissions/).
-- The token and the body come from the environment (WRK_TOKEN, WRK_BODY), set by
-- bench/api_load.py. No response() callback: wrk counts non-2xx/3xx responses itself, and
-- the server's access log gives the status breakdown.
local token = os.getenv("WRK_TOKEN")
local body = os.getenv("WRK_BODY")
if not token or not body then
  error("bench/post_json.lua needs WRK_TOKEN and WRK_BODY in the environment")
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Token " .. token
