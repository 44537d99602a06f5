#!/bin/sh
# Install the SoftFactory Elasticsearch ILM policies, index templates and the Kibana
# saved objects (data views and the seed's searches). Idempotent: run it again after a
# change. Needs only curl and a POSIX shell.
#
#   ES_URL=http://localhost:9200 KIBANA_URL=http://localhost:5601 elk/setup.sh
#
# With security enabled, pass credentials in CURL_AUTH, e.g. CURL_AUTH="-u elastic:..."
set -eu

ES_URL=${ES_URL:-http://localhost:9200}
KIBANA_URL=${KIBANA_URL:-http://localhost:5601}
CURL_AUTH=${CURL_AUTH:-}
HERE=$(cd "$(dirname "$0")" && pwd)

wait_for() { # url name
    i=0
    until curl -fsS $CURL_AUTH -o /dev/null "$1"; do
        i=$((i + 1))
        if [ "$i" -ge 60 ]; then
            echo "$2 did not answer at $1" >&2
            exit 1
        fi
        sleep 5
    done
}

put_json() { # path file
    echo "PUT $1"
    curl -fsS $CURL_AUTH -X PUT "$ES_URL$1" -H 'Content-Type: application/json' \
        --data-binary "@$2" >/dev/null
}

wait_for "$ES_URL/_cluster/health?wait_for_status=yellow&timeout=5s" Elasticsearch

for f in "$HERE"/elasticsearch/ilm/*.json; do
    put_json "/_ilm/policy/$(basename "$f" .json)" "$f"
done
put_json /_component_template/softfactory-mappings \
    "$HERE/elasticsearch/component-template-softfactory-mappings.json"
for f in "$HERE"/elasticsearch/index-templates/*.json; do
    put_json "/_index_template/$(basename "$f" .json)" "$f"
done

wait_for "$KIBANA_URL/api/status" Kibana
echo "POST Kibana saved objects"
curl -fsS $CURL_AUTH -X POST "$KIBANA_URL/api/saved_objects/_import?overwrite=true" \
    -H 'kbn-xsrf: true' --form "file=@$HERE/kibana/saved-objects.ndjson" >/dev/null
echo "done"
