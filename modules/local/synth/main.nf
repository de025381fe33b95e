/*
 * SYNTH: a small synthetic CZI slide with planted MKs and HSPCs (and its truth table) in the
 * given modality (brightfield or fluorescence), so the test profile runs anywhere with no data
 * to download.
 */
process SYNTH {
    tag "${slide_id}"
    label 'process_single'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    tuple val(slide_id), val(seed), val(modality)

    output:
    tuple val(slide_id), val(modality), path("${slide_id}.czi"), emit: slide
    path "${slide_id}.truth.parquet", emit: truth
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress synth ${slide_id}.czi --seed ${seed} --modality ${modality} ${args}

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    touch ${slide_id}.czi ${slide_id}.truth.parquet

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
